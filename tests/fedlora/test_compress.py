"""Compressed updates (fedlora/rounds/compress.py): hand-computed codings, bytes, error feedback,
the job's refusals, and the simulator's bytes and residuals with --compress."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from fedlora.errors import UserError
from fedlora.job.checks import check_compress_args
from fedlora.job.schema import JobConfig
from fedlora.rounds.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from fedlora.rounds.compress import (
    BLOCK,
    NF4,
    SHAPES,
    SIDE,
    Codec,
    pack,
    parse_scheme,
    relative_error,
    round_trip,
    unpack,
)
from fedlora.rounds.wire import tensor_bytes
from fedlora.training.client import LocalClient


def test_int8_is_within_half_a_shipped_scale_of_every_entry():
    # Prepare: 150 entries = blocks of 64, 64, 22; block 1 holds one large entry
    torch.manual_seed(0)
    x = torch.randn(3, 50)
    x.view(-1)[70] = 12.7
    s = parse_scheme("int8")
    # Execute
    p = s.encode(x)
    y = s.decode(p, (3, 50))
    # Assert: int8 codes of x's shape, one float16 scale per block, ≥ the block's absmax / 127
    # (rounded up) and within one float16 step of it; |x - x̂| ≤ scale / 2 entry by entry
    assert p.main.dtype == torch.int8 and p.main.shape == (3, 50) and p.side.dtype == torch.float16
    blocks = torch.nn.functional.pad(x.reshape(-1), (0, 192 - 150)).reshape(3, BLOCK)
    scales = p.side.float()
    assert scales.shape == (3,) and (scales >= blocks.abs().amax(1) / 127).all()
    assert torch.allclose(scales, blocks.abs().amax(1) / 127, rtol=2 ** -10)
    assert scales[1] == pytest.approx(0.1, rel=2 ** -10)  # 12.7 / 127
    per_entry = scales.repeat_interleave(BLOCK)[:150].reshape(3, 50)
    assert ((x - y).abs() <= per_entry / 2).all()
    assert int(p.main.abs().max()) == 127


def test_nf4_codes_the_code_book_exactly_and_packs_two_codes_a_byte():
    # Prepare: a block holding every NF4 value times 0.5 (absmax 0.5, a float16 number), and 3 more
    x = torch.cat([NF4 * 0.5, torch.tensor([0.5, -0.25, 0.0])])
    s = parse_scheme("nf4")
    # Execute
    p = s.encode(x)
    y = s.decode(p, (19,))
    # Assert: ⌈19/2⌉ = 10 bytes of codes, one scale (0.5) for the single block; the code book's
    # values come back exactly, 0.5 is code 15 (1.0), -0.25 / 0.5 = -0.5 the nearest code -0.52507
    assert p.main.dtype == torch.uint8 and p.main.numel() == 10 and p.side.tolist() == [0.5]
    assert torch.equal(y[:16], NF4 * 0.5)
    assert y[16] == 0.5 and y[17] == pytest.approx(-0.5250730514526367 * 0.5) and y[18] == 0
    assert int(p.main[0]) == 0 | (1 << 4)  # codes 0 (-1.0) and 1 (-0.696) share the first byte


def test_topk_keeps_exactly_the_ceil_share_of_largest_entries():
    # Prepare: 30 entries, F = 0.1 (0.1 × 30 is 3.0000000000000004 in floating point)
    x = torch.tensor([float(i % 7) * (-1) ** i for i in range(30)])
    s = parse_scheme("topk:0.1")
    # Execute
    p = s.encode(x)
    y = s.decode(p, (30,))
    # Assert: k = 3 entries, the three of |x| = 6 at indices 6, 13, 20 (ties keep the lower
    # index; 27 is the fourth 6), int16 indices, float32 values; the rest decode to 0
    assert p.main.dtype == torch.int16 and p.main.tolist() == [6, 13, 20]
    assert p.side.tolist() == [6.0, -6.0, 6.0]
    assert torch.count_nonzero(y) == 3 and y[6] == 6 and y[13] == -6 and y[27] == 0
    assert s.k(1) == 1 and s.k(0) == 0 and parse_scheme("topk:1").k(30) == 30


def test_bytes_of_each_scheme_hand_computed():
    # Prepare: one 3 × 50 tensor (150 entries: 3 blocks)
    x = torch.randn(3, 50)
    # Execute / Assert: raw payload bytes, as the module docstring counts them
    want = {"none": 600, "fp16": 300, "bf16": 300, "int8": 150 + 2 * 3, "nf4": 75 + 2 * 3,
            "topk:0.1": 15 * 2 + 15 * 4, "topk:0.5": 75 * 2 + 75 * 4}
    for name, nbytes in want.items():
        s = parse_scheme(name)
        assert s.nbytes(s.encode(x)) == nbytes, name
    # a tensor of 2^15 + 1 entries needs int32 indices: 4 + 4 bytes a kept entry
    big = parse_scheme("topk:0.001")
    assert big.nbytes(big.encode(torch.randn(2 ** 15 + 1))) == math.ceil(32.769) * 8


def test_message_round_trip_and_idempotent_state_schemes():
    # Prepare: two tensors of awkward sizes
    torch.manual_seed(1)
    x = {"l.lora_A": torch.randn(4, 33), "head.w": torch.randn(5)}
    for name in ("fp16", "bf16", "int8", "nf4", "topk:0.25"):
        s = parse_scheme(name)
        # Execute
        message = pack(s, x)
        got = unpack(s, message)
        # Assert: the message is the main parts by name, the sides and the shapes; it decodes to
        # what each tensor's own coding gives, and int8 / nf4 / casts re-encode exactly
        assert set(message) == {"head.w", "l.lora_A", SHAPES} | ({SIDE} if s.side_len(5) else set())
        assert message[SHAPES].tolist() == [1, 5, 2, 4, 33]
        for k in x:
            assert torch.equal(got[k], round_trip(s, x[k]))
        if s.idempotent:
            assert all(torch.equal(round_trip(s, got[k]), got[k]) for k in x)
    assert pack(parse_scheme("none"), x) == x
    with pytest.raises(ValueError, match="expected"):
        unpack(parse_scheme("int8"), pack(parse_scheme("int8"), x), {"head.w": (6,)})


@pytest.mark.parametrize("name", ["bf16", "int8", "nf4", "topk:0.1", "topk:0.001"])
def test_planner_counts_coded_messages_from_their_shapes(name):
    # Prepare: a message of four dtypes (codes, float16 scales, int32 shapes; top-k: int16 and
    # int32 indices beside float32 values)
    x = {"a.lora_A": torch.randn(8, 40), "a.lora_B": torch.randn(40000, 1), "head.bias": torch.randn(3)}
    # Execute / Assert: fedlora-plan's size of the record from names, dtypes and shapes is exact
    from fedlora.plan.traffic import record_bytes
    message = pack(parse_scheme(name), x)
    assert record_bytes(message) == tensor_bytes(message)


def test_error_feedback_carries_the_residual_into_the_next_upload():
    # Prepare: top-1 of 4 entries, reference 1 on the first entry
    codec = Codec(parse_scheme("topk:0.25"))
    ref = {"t": torch.tensor([1.0, 0.0, 0.0, 0.0])}
    # Execute: round 1 uploads θ = [4, 1, 0.5, 0.2] (x = θ - ref = [3, 1, 0.5, 0.2]); round 2
    # uploads θ = ref (x = 0 + the residual)
    m1, e1, (err1, norm1) = codec.encode({"t": torch.tensor([4.0, 1.0, 0.5, 0.2])}, ref, {})
    m2, e2, _ = codec.encode({"t": torch.tensor([1.0, 0.0, 0.0, 0.0])}, ref, e1)
    # Assert: round 1 ships index 0 (value 3), the server decodes ref + 3 = 4, and the client keeps
    # [0, 1, 0.5, 0.2]; round 2 ships the residual's largest, 1 at index 1, and keeps [0, 0, 0.5, 0.2]
    assert m1["t"].tolist() == [0] and m1[SIDE].tolist() == [3.0]
    assert codec.decode(m1, ref)["t"].tolist() == [4.0, 0.0, 0.0, 0.0]
    assert torch.allclose(e1["t"], torch.tensor([0.0, 1.0, 0.5, 0.2]))
    assert err1 == pytest.approx(1 + 0.25 + 0.04) and norm1 == pytest.approx(16 + 1 + 0.25 + 0.04)
    assert m2["t"].tolist() == [1] and m2[SIDE].tolist() == [1.0]
    assert torch.allclose(e2["t"], torch.tensor([0.0, 0.0, 0.5, 0.2]))
    # a round that uploads another tensor (RoLoRA alternates A and B) keeps t's residual for later
    _, e3, _ = codec.encode({"u": torch.ones(4)}, {}, e2)
    assert set(e3) == {"t", "u"} and torch.equal(e3["t"], e2["t"])
    # without error feedback nothing is kept; a lossless scheme keeps nothing either
    assert Codec(parse_scheme("topk:0.25"), feedback=False).encode({"t": torch.ones(4)}, {}, {})[1] == {}
    assert Codec(parse_scheme("none")).encode({"t": torch.ones(4)}, {}, {})[1] == {}
    assert relative_error([(1.0, 4.0), (3.0, 12.0)]) == pytest.approx(0.5)


def test_a_redone_round_codes_from_the_residual_its_first_attempt_used():
    # Prepare: a deployed client's coding state (LocalClient.coded reads codec, reference, residuals)
    client = SimpleNamespace(codec=Codec(parse_scheme("topk:0.25")), reference={}, residuals={})
    first = {"t": torch.tensor([4.0, 1.0, 0.5, 0.2])}
    # Execute: round 1, round 2, then round 2 again (a resumed server redoes it), then round 3
    LocalClient.coded(client, first, 1)
    m2, _ = LocalClient.coded(client, {"t": torch.zeros(4)}, 2)
    m2_again, _ = LocalClient.coded(client, {"t": torch.zeros(4)}, 2)
    m3, _ = LocalClient.coded(client, {"t": torch.zeros(4)}, 3)
    # Assert: the redo adds round 1's residual [0, 1, 0.5, 0.2] again (ships 1 at index 1), not its
    # first attempt's [0, 0, 0.5, 0.2]; round 3 goes on from round 2's, and two rounds are kept
    assert m2["t"].tolist() == m2_again["t"].tolist() == [1] and m2_again[SIDE].tolist() == [1.0]
    assert m3["t"].tolist() == [2] and m3[SIDE].tolist() == [0.5]
    assert sorted(client.residuals) == [2, 3]
    assert torch.allclose(client.residuals[3]["t"], torch.tensor([0.0, 0.0, 0.0, 0.2]))


def test_residuals_survive_a_checkpoint(tmp_path):
    # Prepare: two clients' residuals, as the coordinator saves them
    residual = {0: {"l.lora_A": torch.randn(2, 3)}, 7: {"head.w": torch.arange(4.0)}}
    # Execute
    save_checkpoint(tmp_path, {"round": 2, "residual": residual})
    got = load_checkpoint(find_checkpoint(tmp_path))["residual"]
    # Assert: the same clients and tensors
    assert set(got) == {0, 7} and torch.equal(got[7]["head.w"], torch.arange(4.0))
    assert torch.equal(got[0]["l.lora_A"], residual[0]["l.lora_A"])


@pytest.mark.parametrize(("flags", "message"), [
    ({"compress": "topk:0"}, "topk:F needs a share F in (0, 1]"),
    ({"compress": "topk:1.5"}, "topk:F needs a share F in (0, 1]"),
    ({"compress": "topk:x"}, "topk:F needs a share F in (0, 1]"),
    ({"compress": "int4"}, "unknown scheme 'int4'"),
    ({"compress": "int8:2"}, "unknown scheme 'int8:2'"),
    ({"compress_down": "topk:0.1"}, "the server's global state is not sparse"),
    ({"compress": "int8", "secagg": True}, "SecAgg+ already quantizes"),
])
def test_bad_compression_is_refused_in_one_line(flags, message):
    # Prepare / Execute / Assert
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")) \
            as info:
        check_compress_args(JobConfig(**flags))
    assert "\n" not in str(info.value)
    check_compress_args(JobConfig(compress_down="bf16", secagg=True))  # the download is not masked: allowed


def test_cli_exits_2_on_a_bad_share(tmp_path, capsys):
    # Prepare / Execute: the simulator with topk:2 (refused before anything loads or is written)
    from fedlora.simulations.cli import main as sim
    code = sim(["--compress", "topk:2", "--out", str(tmp_path / "run")])
    # Assert: exit 2, one line, nothing written
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "topk:F" in err
    assert not (tmp_path / "run").exists()


def test_compare_runs_every_strategy_with_every_coding(tmp_path):
    from fedlora.simulations.compare import build_parser, plan_runs
    # Prepare
    args = build_parser().parse_args(["--strategies", "fedavg,fed-sb", "--compress", "none,int8,topk:0.1",
                                      "--out", str(tmp_path / "cmp")])
    # Execute
    plan = plan_runs(args)
    # Assert: strategy × coding, in that order, each job with its own coding
    assert [label for label, _ in plan] == ["fedavg + none", "fedavg + int8", "fedavg + topk:0.1",
                                            "fed-sb + none", "fed-sb + int8", "fed-sb + topk:0.1"]
    assert [cfg.compress for _, cfg in plan] == ["none", "int8", "topk:0.1"] * 2
    assert [label for label, _ in plan_runs(build_parser().parse_args(
        ["--strategies", "fedavg", "--out", str(tmp_path / "one")]))] == ["fedavg"]
    for bad, message in (("int8,int8", "each once"), ("none,topk:2", "topk:F needs")):
        with pytest.raises(UserError, match=message):
            plan_runs(build_parser().parse_args(["--compress", bad, "--out", str(tmp_path / "x")]))


def JOB(tiny_bert_dir, tiny_csv) -> list[str]:  # noqa: N802 (a constant's spelling)
    return ["--model", str(tiny_bert_dir), "--data", str(tiny_csv), "--num-clients", "2", "--rounds",
            "2", "--local-steps", "2", "--batch-size", "4", "--max-length", "16", "--rank", "4"]


def _sim(tiny_bert_dir, tiny_csv, out, *extra):
    from fedlora.simulations.cli import main as sim
    assert sim([*JOB(tiny_bert_dir, tiny_csv), "--quiet", "--out", str(out), *extra]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_simulator_ships_int8_uploads_at_the_hand_computed_bytes(tiny_bert_dir, tiny_csv, tmp_path):
    from fedlora.simulations.cli import build_parser, to_config
    from fedlora.simulations.engine import train
    # Prepare / Execute: the job with --compress int8 --compress-down fp16 through the engine (its
    # coordinator holds the clients' residuals), saved and restored
    cfg = to_config(build_parser().parse_args([*JOB(tiny_bert_dir, tiny_csv), "--compress", "int8",
                                               "--compress-down", "fp16"]))
    (tmp_path / "int8").mkdir()
    _, coord = train(cfg, tmp_path / "int8")
    rows = coord.rows
    coord.save(tmp_path)
    saved = load_checkpoint(find_checkpoint(tmp_path))["residual"]
    # Assert: each client's upload is the int8 message of its tensors' shapes (its size does not
    # depend on the values: n + 2 × blocks bytes, plus the framing), the download fp16's; both
    # clients' residuals (x − x̂, under half a scale: tiny) are kept and survive the checkpoint
    shapes = {k: torch.zeros(v.shape) for k, v in coord.residual[0].items()}
    assert set(coord.residual) == {0, 1} and set(saved) == {0, 1}
    assert all(torch.equal(saved[c][k], coord.residual[c][k]) for c in (0, 1) for k in shapes)
    assert 0 < max(float(t.abs().max()) for t in coord.residual[1].values()) < 1e-2
    up = tensor_bytes(pack(parse_scheme("int8"), shapes))
    assert all(r["bytes_up_per_client"] == [up, up] for r in rows[1:])
    assert all(0 < r["compress_error"] < 0.01 for r in rows[1:])
    n = sum(t.numel() for t in shapes.values())
    blocks = sum(-(-t.numel() // 64) for t in shapes.values())
    int8 = parse_scheme("int8")
    assert sum(int8.nbytes(int8.encode(t)) for t in shapes.values()) == n + 2 * blocks
    down = tensor_bytes(pack(parse_scheme("fp16"), shapes))  # fedavg sends what it receives: A, B, head
    assert [r["bytes_down_per_client"] for r in rows[1:]] == [[down, down]] * 2


@pytest.mark.slow
def test_client_level_dp_clips_and_noises_the_decoded_upload(tiny_bert_dir, tiny_csv, tmp_path):
    # Prepare / Execute: --dp client with top-k uploads and a clip below any update's norm
    rows = _sim(tiny_bert_dir, tiny_csv, tmp_path / "dp", "--strategy", "fedavg", "--dp", "client",
                "--epsilon", "50", "--delta", "0.1", "--dp-reproducible", "--compress", "topk:0.5",
                "--update-clip", "1e-6")
    # Assert: both rounds ran under the ledger, with the coding's error reported, and the server
    # clipped every decoded update (compress, then the server's clip and noise)
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["epsilon"] > rows[1]["epsilon"] > 0
    assert all(0 < r["compress_error"] < 1 and r["clipped_fraction"] == 1.0 for r in rows[1:])


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["flora", "fed-sb"])
def test_planned_coded_bytes_equal_the_simulators(tiny_llama_dir, tmp_path, strategy):
    from dataclasses import replace

    from fedlora.plan.shape import build_shape
    from fedlora.plan.traffic import plan_traffic
    from fedlora.simulations.engine import run
    from tests.fedlora.test_plan_traffic import _job
    # Prepare: FLoRA (folds, and the catch-up of a client that missed a round) or Fed-SB (round 0's
    # sketches, coded as one-shot uploads) with nf4 uploads and int8 downloads, on the tiny LLaMA
    # (the planner's test job)
    data = tmp_path / "lm.jsonl"
    data.write_text("".join(json.dumps({"text": f"the cat sat on mat number {i}"}) + "\n" for i in range(40)))
    cfg = replace(_job(tiny_llama_dir, data, strategy), compress="nf4", compress_down="int8", rounds=3)
    # Execute
    rows = run(cfg, tmp_path / "run")
    shape = build_shape(cfg)
    plan = plan_traffic(cfg, shape.layers, shape.heads)
    # Assert: every round, every client, both ways, to the byte
    assert [p.up for p in plan] == [r["bytes_up_per_client"] for r in rows]
    assert [p.down for p in plan] == [r["bytes_down_per_client"] for r in rows]
    if strategy == "flora":
        assert len(set(plan[3].down)) > 1  # a catch-up fold travelled
    else:  # the sketches travelled as nf4: an eighth of float32's bytes plus the framing, which is
        # much of a tiny model's 256-entry sketches (27% here)
        fp32 = plan_traffic(replace(cfg, compress="none"), shape.layers, shape.heads, rounds=0)
        assert all(0 < c < f / 3 for c, f in zip(plan[0].up, fp32[0].up, strict=True))

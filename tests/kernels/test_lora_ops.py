"""Batched per-client adapter ops against their row-by-row references.

Every op is checked in values and in gradients (autograd through both the op and
its ``*_reference``), on the segments path (equal contiguous segments, including a
subset of slots in a non-sorted order) and on the gather path (shuffled ids, unequal
counts), for 2-D ``(N, d)``, 3-D ``(N, T, d)`` and 4-D inputs. Everything is float64
so the tolerances can be tight.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.kernels import (
    Routing,
    dense_delta,
    dense_delta_reference,
    lora_delta,
    lora_delta_reference,
    sb_delta,
    sb_delta_reference,
)

DTYPE = torch.float64
K, R, D_IN, D_OUT = 3, 4, 6, 5
TOL = {"rtol": 1e-10, "atol": 1e-12}


# ----------------------------------------------------------------------------- helpers


def make_routing(kind: str) -> Routing:
    """The routings exercised by every op test (``K = 3`` client slots)."""
    if kind == "segments-all":
        return Routing.segments(torch.tensor([0, 1, 2]), rows_per_slot=2)
    if kind == "segments-subset":
        return Routing.segments(torch.tensor([2, 0]), rows_per_slot=3)
    if kind == "from-ids-equal":
        return Routing.from_ids(torch.tensor([1, 1, 0, 0, 2, 2]))
    if kind == "from-ids-subset":
        return Routing.from_ids(torch.tensor([2, 2, 2, 0, 0, 0]))
    if kind == "gather-shuffled":
        return Routing.from_ids(torch.tensor([2, 0, 0, 1, 2, 2, 0]))
    if kind == "gather-forced":
        # Equal contiguous segments, but forced onto the gather path.
        return Routing(ids=torch.tensor([1, 1, 0, 0, 2, 2]), slots=None)
    raise AssertionError(kind)


ROUTINGS = [
    "segments-all",
    "segments-subset",
    "from-ids-equal",
    "from-ids-subset",
    "gather-shuffled",
    "gather-forced",
]
SHAPES = {"2d": (), "3d": (3,), "4d": (2, 2)}   # middle dims between N and d


def leaf(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=DTYPE).requires_grad_(True)


def values_and_grads(fn, inputs: list[torch.Tensor], upstream: torch.Tensor):
    """``fn(*inputs)`` and the gradients of ``<fn(*inputs), upstream>`` w.r.t. inputs."""
    out = fn(*inputs)
    grads = torch.autograd.grad((out * upstream).sum(), inputs, allow_unused=True)
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(inputs, grads, strict=True)]
    return out, grads


def assert_op_matches_reference(op, ref, inputs, routing: Routing, out_shape, gen):
    upstream = torch.randn(*out_shape, generator=gen, dtype=DTYPE)
    out, grads = values_and_grads(lambda *a: op(*a, routing), inputs, upstream)
    ref_out, ref_grads = values_and_grads(lambda *a: ref(*a, routing.ids), inputs, upstream)
    assert out.shape == tuple(out_shape)
    torch.testing.assert_close(out, ref_out, **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)


# ----------------------------------------------------------------------------- Routing


def test_from_ids_equal_contiguous_segments_sets_slots():
    # Prepare
    ids = torch.tensor([2, 2, 0, 0, 1, 1], dtype=torch.int32)

    # Execute
    routing = Routing.from_ids(ids)

    # Assert
    assert routing.slots is not None
    assert routing.slots.tolist() == [2, 0, 1]
    assert routing.ids.dtype == torch.long
    assert routing.ids.tolist() == [2, 2, 0, 0, 1, 1]


def test_from_ids_single_segment_and_subset():
    # Prepare / Execute
    single = Routing.from_ids(torch.tensor([3, 3, 3]))
    subset = Routing.from_ids(torch.tensor([2, 2, 0, 0]))

    # Assert
    assert single.slots is not None and single.slots.tolist() == [3]
    assert subset.slots is not None and subset.slots.tolist() == [2, 0]


@pytest.mark.parametrize(
    "ids",
    [
        [0, 0, 1],                 # unequal counts
        [0, 1, 1, 1, 2, 2],        # unequal counts
        [0, 0, 1, 1, 0, 0],        # slot 0 in two segments (equal counts)
        [1, 0, 1, 0],              # interleaved: repeated slots
        [2, 0, 0, 1, 2, 2, 0],     # shuffled
    ],
)
def test_from_ids_not_equal_contiguous_gives_no_slots(ids):
    # Prepare / Execute
    routing = Routing.from_ids(torch.tensor(ids))

    # Assert
    assert routing.slots is None
    assert routing.ids.tolist() == ids


def test_from_ids_empty():
    # Prepare / Execute
    routing = Routing.from_ids(torch.zeros(0, dtype=torch.long))

    # Assert
    assert routing.slots is None
    assert routing.ids.numel() == 0


def test_segments_builds_contiguous_ids():
    # Prepare / Execute
    routing = Routing.segments(torch.tensor([2, 0]), rows_per_slot=3)

    # Assert
    assert routing.ids.tolist() == [2, 2, 2, 0, 0, 0]
    assert routing.slots.tolist() == [2, 0]


@pytest.mark.parametrize("kind", ROUTINGS)
def test_routing_fixtures_take_the_intended_path(kind):
    # Prepare / Execute
    routing = make_routing(kind)

    # Assert: the op tests below really exercise both paths.
    expects_segments = kind.startswith(("segments", "from-ids"))
    assert (routing.slots is not None) == expects_segments


# ----------------------------------------------------------------------------- ops


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_lora_delta_matches_reference(kind, shape):
    # Prepare
    gen = torch.Generator().manual_seed(1)
    routing = make_routing(kind)
    n = routing.ids.numel()
    mid = SHAPES[shape]
    x = leaf(gen, n, *mid, D_IN)
    A = leaf(gen, K, R, D_IN)
    B = leaf(gen, K, D_OUT, R)
    scale = (torch.rand(K, generator=gen, dtype=DTYPE) + 0.5).requires_grad_(True)

    # Execute / Assert (values and grads w.r.t. x, A, B and scale)
    assert_op_matches_reference(lora_delta, lora_delta_reference, [x, A, B, scale], routing,
                                (n, *mid, D_OUT), gen)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_sb_delta_matches_reference(kind, shape):
    # Prepare
    gen = torch.Generator().manual_seed(2)
    routing = make_routing(kind)
    n = routing.ids.numel()
    mid = SHAPES[shape]
    x = leaf(gen, n, *mid, D_IN)
    A = leaf(gen, R, D_IN)
    B = leaf(gen, D_OUT, R)
    Rk = leaf(gen, K, R, R)
    scale = 1.7

    def op(x, A, B, Rk, routing):
        return sb_delta(x, A, B, Rk, scale, routing)

    def ref(x, A, B, Rk, ids):
        return sb_delta_reference(x, A, B, Rk, scale, ids)

    # Execute / Assert (values and grads w.r.t. x, A, B and R)
    assert_op_matches_reference(op, ref, [x, A, B, Rk], routing, (n, *mid, D_OUT), gen)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", ROUTINGS)
def test_dense_delta_matches_reference(kind, shape, with_bias):
    # Prepare
    gen = torch.Generator().manual_seed(3)
    routing = make_routing(kind)
    n = routing.ids.numel()
    mid = SHAPES[shape]
    x = leaf(gen, n, *mid, D_IN)
    W = leaf(gen, K, D_OUT, D_IN)
    inputs = [x, W]
    if with_bias:
        inputs.append(leaf(gen, K, D_OUT))

    def op(x, W, *rest):
        *bias, routing = rest
        return dense_delta(x, W, routing, *bias)

    def ref(x, W, *rest):
        *bias, ids = rest
        return dense_delta_reference(x, W, ids, *bias)

    # Execute / Assert (values and grads w.r.t. x, W and bias)
    assert_op_matches_reference(op, ref, inputs, routing, (n, *mid, D_OUT), gen)


def test_unused_slot_gets_zero_gradient_on_segments_path():
    # Prepare: slots [2, 0] of K = 3, so slot 1's factors take no part.
    gen = torch.Generator().manual_seed(4)
    routing = Routing.segments(torch.tensor([2, 0]), rows_per_slot=2)
    x = leaf(gen, 4, 3, D_IN)
    A = leaf(gen, K, R, D_IN)
    B = leaf(gen, K, D_OUT, R)
    scale = torch.ones(K, dtype=DTYPE)

    # Execute
    lora_delta(x, A, B, scale, routing).sum().backward()

    # Assert
    assert torch.count_nonzero(A.grad[1]) == 0
    assert torch.count_nonzero(B.grad[1]) == 0
    assert torch.count_nonzero(A.grad[0]) > 0 and torch.count_nonzero(A.grad[2]) > 0


def test_lora_delta_hand_computed():
    # Prepare: d_in = 2, d_out = 1, r = 1, two clients, one row each.
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=DTYPE)
    A = torch.tensor([[[1.0, 1.0]], [[1.0, -1.0]]], dtype=DTYPE)    # (2, 1, 2)
    B = torch.tensor([[[2.0]], [[3.0]]], dtype=DTYPE)               # (2, 1, 1)
    scale = torch.tensor([0.5, 2.0], dtype=DTYPE)
    # row 0, client 1: 2 * 3 * (1 - 2) = -6 ; row 1, client 0: 0.5 * 2 * (3 + 4) = 7
    expected = torch.tensor([[-6.0], [7.0]], dtype=DTYPE)

    # Execute
    gathered = lora_delta(x, A, B, scale, Routing(ids=torch.tensor([1, 0]), slots=None))
    segmented = lora_delta(x, A, B, scale, Routing.segments(torch.tensor([1, 0]), 1))

    # Assert
    torch.testing.assert_close(gathered, expected)
    torch.testing.assert_close(segmented, expected)

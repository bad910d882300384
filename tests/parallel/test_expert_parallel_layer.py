"""Expert parallelism of a bare SwitchFFN against the same layer in one process (2 gloo ranks).

Reference: the unparallelized layer called once on the concatenation of every rank's tokens, with
``group_size`` = tokens per rank, so its routing groups are the ranks' groups. Capacity mode must match bitwise
(the same rows meet the same weights); dropless within fp32 rounding (an expert's matmul sees rows in another
batch). Expert gradients after backward are those of the sum of the ranks' losses.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from parallel.pool import WorkerPool

E, M, F, TOKENS = 8, 16, 32, 24


def _reference_layer(capacity_factor, dtype=torch.float32, **kw):
    from switchformer.moe import SwitchFFN
    from switchformer.moe.dispatch import LocalDispatcher

    torch.manual_seed(1)
    # the padded layout computes capacity buffers with one batched matmul, as the all-to-all capacity path does
    layout = "ragged" if capacity_factor is None else "padded"
    layer = SwitchFFN(M, F, E, capacity_factor=capacity_factor, eval_capacity_factor=capacity_factor,
                      exploration="argmax", router_input_dropout=0.0, dispatcher=LocalDispatcher(layout), **kw)
    return layer.to(dtype)


def _inputs(world: int, dtype, skew: bool = False):
    torch.manual_seed(2)
    x = torch.randn(world, TOKENS, M, dtype=dtype)
    if skew:  # push every token toward a few experts, leaving others empty (and rank 0 with fewer)
        x = x.abs() + 3.0
    return x


def _layer_parity(capacity_factor, dtype_name: str, skew: bool, ep_mesh_dims):
    from torch.distributed.device_mesh import init_device_mesh

    from switchformer.distributed import parallelize

    dtype = getattr(torch, dtype_name)
    rank, world = dist.get_rank(), dist.get_world_size()
    x_all = _inputs(world, dtype, skew)

    ref = _reference_layer(capacity_factor, dtype, group_size=TOKENS)
    x_ref = x_all.reshape(-1, M).clone().requires_grad_(True)
    y_ref, aux_ref = ref(x_ref)
    y_ref.pow(2).sum().backward()

    layer = _reference_layer(capacity_factor, dtype)
    mesh = init_device_mesh("cpu", ep_mesh_dims[1], mesh_dim_names=ep_mesh_dims[0])
    layer = parallelize(layer, mesh, dense="none")
    x = x_all[rank].clone().requires_grad_(True)
    y, aux = layer(x)
    y.pow(2).sum().backward()

    mine = slice(rank * TOKENS, (rank + 1) * TOKENS)
    local_experts = slice(rank * E // world, (rank + 1) * E // world)
    per_rank_tpe = torch.stack([t for t in _gather(aux.tokens_per_expert)]).sum(0)
    return {
        "y_equal": bool(torch.equal(y, y_ref[mine])),
        "y_err": float((y - y_ref[mine]).detach().abs().max()),
        "x_grad_err": float((x.grad - x_ref.grad[mine]).abs().max()),
        "w_in_grad_err": float(
            (layer.experts.w_in.grad.to_local() - ref.experts.w_in.grad[local_experts]).abs().max()),
        "w_out_grad_err": float(
            (layer.experts.w_out.grad.to_local() - ref.experts.w_out.grad[local_experts]).abs().max()),
        "tpe_equal": bool(torch.equal(per_rank_tpe, aux_ref.tokens_per_expert)),
        "dropped": int(torch.stack(_gather(aux.dropped_tokens)).sum()),
        "dropped_ref": int(aux_ref.dropped_tokens),
        "lb": float(torch.stack(_gather(aux.load_balancing_loss.detach())).mean()),
        "lb_ref": float(aux_ref.load_balancing_loss.detach()),
        "z": float(torch.stack(_gather(aux.router_z_loss.detach())).mean()),
        "z_ref": float(aux_ref.router_z_loss.detach()),
        "local_shape": tuple(layer.experts.w_in.to_local().shape),
        "global_shape": tuple(layer.experts.w_in.shape),
        "empty_expert": bool((aux_ref.tokens_per_expert == 0).any()),
    }


def _gather(t: torch.Tensor) -> list[torch.Tensor]:
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t.contiguous())
    return out


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(2) as p:
        yield p


@pytest.mark.parametrize("skew", [False, True])
def test_capacity_mode_is_bitwise_equal(pool, skew):
    for r in pool.run(_layer_parity, 1.0, "float32", skew, (("ep",), (2,))):
        assert r["y_equal"], r
        assert r["x_grad_err"] < 1e-6 and r["w_in_grad_err"] < 1e-6 and r["w_out_grad_err"] < 1e-6, r
        assert r["tpe_equal"] and r["dropped"] == r["dropped_ref"], r
        assert r["lb"] == pytest.approx(r["lb_ref"], rel=1e-6) and r["z"] == pytest.approx(r["z_ref"], rel=1e-6)
        assert r["local_shape"] == (E // 2, F, M) and r["global_shape"] == (E, F, M)
    if skew:
        assert r["dropped_ref"] > 0 and r["empty_expert"]


@pytest.mark.parametrize("skew", [False, True])
def test_dropless_mode_matches(pool, skew):
    for r in pool.run(_layer_parity, None, "float32", skew, (("dp", "ep"), (1, 2))):
        assert r["y_err"] < 1e-6, r
        assert r["x_grad_err"] < 1e-5 and r["w_in_grad_err"] < 1e-5 and r["w_out_grad_err"] < 1e-5, r
        assert r["tpe_equal"] and r["dropped"] == 0 == r["dropped_ref"], r
        assert r["lb"] == pytest.approx(r["lb_ref"], rel=1e-6)
    if skew:
        assert r["empty_expert"]


def test_dropless_float64_is_exact_to_rounding(pool):
    for r in pool.run(_layer_parity, None, "float64", True, (("ep",), (2,))):
        assert r["y_err"] < 1e-12 and r["w_in_grad_err"] < 1e-12, r


def _rank_without_tokens():
    """Dropless: rank 1 routes no token at all; every collective still runs and rank 0's outputs are exact."""
    from torch.distributed.device_mesh import init_device_mesh

    from switchformer.distributed import parallelize

    rank = dist.get_rank()
    x_all = _inputs(dist.get_world_size(), torch.float64)
    ref = _reference_layer(None, torch.float64)
    y_ref, _ = ref(x_all[0])
    layer = parallelize(_reference_layer(None, torch.float64), init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)),
                        dense="none")
    x = (x_all[0] if rank == 0 else x_all[0][:0]).clone().requires_grad_(True)
    y, aux = layer(x)
    y.sum().backward()  # the backward all-to-alls run on both ranks too
    err = float((y - y_ref).detach().abs().max()) if rank == 0 else 0.0
    finite = bool(torch.isfinite(layer.experts.w_in.grad.to_local()).all())
    return {"err": err, "shape": tuple(y.shape), "grad_finite": finite}


def test_rank_with_zero_tokens(pool):
    r0, r1 = pool.run(_rank_without_tokens)
    assert r0["err"] < 1e-12 and r0["shape"] == (TOKENS, M)
    assert r1["shape"] == (0, M) and r0["grad_finite"] and r1["grad_finite"]


def _mismatched_experts():
    from torch.distributed.device_mesh import init_device_mesh

    from switchformer.distributed import parallelize
    from switchformer.moe import SwitchFFN

    layer = SwitchFFN(M, F, 4 if dist.get_rank() == 0 else 8)
    try:
        parallelize(layer, init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)), dense="none")
    except ValueError as e:
        return str(e)
    return "no error"


def test_ranks_with_different_configs_fail_at_start_naming_the_field(pool):
    for message in pool.run(_mismatched_experts):
        assert "num_experts differs" in message and "rank 0: 4" in message and "rank 1: 8" in message, message


def _indivisible_experts():
    from torch.distributed.device_mesh import init_device_mesh

    from switchformer.distributed import parallelize
    from switchformer.moe import SwitchFFN

    try:
        parallelize(SwitchFFN(M, F, 3), init_device_mesh("cpu", (2,), mesh_dim_names=("ep",)), dense="none")
    except ValueError as e:
        return str(e)
    return "no error"


def test_experts_not_divisible_by_ep_is_a_clear_error(pool):
    for message in pool.run(_indivisible_experts):
        assert "3 experts" in message and "ep=2" in message, message


def test_bfloat16_capacity_mode_is_bitwise_equal(pool):
    """bfloat16 travels through gloo's all-to-all unchanged (tiny tensors: these CPUs have no bf16 matmul units)."""
    for r in pool.run(_layer_parity, 1.0, "bfloat16", False, (("ep",), (2,))):
        assert r["y_equal"], r
        assert r["tpe_equal"] and r["dropped"] == r["dropped_ref"], r

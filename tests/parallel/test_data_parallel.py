"""Data x expert parallelism of a whole model (FSDP2 or DDP for the dense weights) against one process, 4 gloo ranks.

Every rank holds its own micro-batch; the reference is the same model in one process on the concatenation of the
ranks' batches, its routing groups set to one rank's tokens (``moe.group_size``). After backward and
``reduce_expert_gradients``, every gradient must be that of the reference's mean loss: the test that catches the
2x expert gradient of a wrong divisor and DDP averaging different experts.
"""

from __future__ import annotations

import pytest
import torch

from parallel.pool import WorkerPool

BATCH, SEQ, VOCAB = 2, 8, 128


def _config(group_size=None, dtype="float32"):
    from switchformer.config import ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, encoder_sparse_step=1, decoder_sparse_step=2,
        moe=MoEConfig(num_experts=4, capacity_factor=1.0, eval_capacity_factor=1.0, exploration="argmax",
                      router_input_dropout=0.0, group_size=group_size, router_dtype=dtype),
    )


def _batch(world: int):
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (world * BATCH, SEQ), generator=g)
    labels = torch.randint(2, VOCAB, (world * BATCH, SEQ), generator=g)
    dec = torch.cat([torch.zeros(world * BATCH, 1, dtype=torch.long), labels[:, :-1]], 1)
    return {"input_ids": ids, "decoder_input_ids": dec, "labels": labels}


def _build(group_size, dtype_name):
    from switchformer.models import build_model

    torch.manual_seed(3)
    return build_model(_config(group_size, dtype_name)).to(getattr(torch, dtype_name))


def _grad_parity(mesh_shape, dense: str, dtype_name: str = "float64"):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor

    from switchformer.distributed import (
        clip_grad_norm_,
        parallel_state,
        parallelize,
        reduce_expert_gradients,
        unwrap,
    )

    names = ("dp", "ep", "tp")[: len(mesh_shape)]
    shards = mesh_shape[0] * mesh_shape[1]  # ranks with different tokens ("tp" ranks share theirs)
    batch = _batch(shards)
    ref = _build(BATCH * SEQ, dtype_name)
    ref(**batch).loss.backward()
    ref_norm = float(torch.nn.utils.clip_grad_norm_(ref.parameters(), float("inf")))
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}

    model = _build(None, dtype_name)
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    model = parallelize(model, mesh, dense=dense)
    ep = parallel_state(model).ep
    ep_rank = mesh.get_local_rank("ep")
    shard = mesh.get_local_rank("dp") * mesh_shape[1] + ep_rank
    mine = {k: v[shard * BATCH:(shard + 1) * BATCH] for k, v in batch.items()}
    out = model(**mine)
    out.loss.backward()
    reduce_expert_gradients(model)
    norm = float(clip_grad_norm_(model, float("inf")).double())

    worst, worst_name = 0.0, ""
    for name, p in unwrap(model).named_parameters():
        g = p.grad
        expected = ref_grads[name]
        assert g is not None, f"{name} has no gradient"
        if isinstance(g, DTensor) and name in parallel_state(model).expert_names:
            g = g.to_local()
            per = expected.shape[0] // ep
            expected = expected[ep_rank * per:(ep_rank + 1) * per]
        elif isinstance(g, DTensor):
            g = g.full_tensor()
        rel = float((g - expected).abs().max() / expected.abs().max().clamp(min=1e-30))
        if rel > worst:
            worst, worst_name = rel, name
    return {"worst": worst, "name": worst_name, "norm": norm, "ref_norm": ref_norm}


@pytest.fixture(scope="module")
def pool():
    with WorkerPool(4) as p:
        yield p


@pytest.mark.parametrize("mesh_shape,dense", [((2, 2), "fsdp"), ((1, 4), "fsdp"), ((4, 1), "fsdp"),
                                              ((2, 2), "ddp"), ((4, 1), "ddp")])
def test_gradients_equal_single_process(pool, mesh_shape, dense):
    for r in pool.run(_grad_parity, mesh_shape, dense):
        assert r["worst"] < 1e-9, r
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-9), r


@pytest.mark.parametrize("capacity_factor", [1.0, None])
def test_bare_layer_at_ep4(pool, capacity_factor):
    """The layer checks of test_expert_parallel_layer at ep=4 (two experts per rank), and on a 2 x 2 mesh."""
    from parallel.test_expert_parallel_layer import _layer_parity

    for mesh in ((("ep",), (4,)), (("dp", "ep"), (1, 4))):
        for r in pool.run(_layer_parity, capacity_factor, "float32", True, mesh):
            if capacity_factor is not None:
                assert r["y_equal"], r
            assert r["y_err"] < 1e-6 and r["w_in_grad_err"] < 1e-5 and r["w_out_grad_err"] < 1e-5, r
            assert r["tpe_equal"] and r["dropped"] == r["dropped_ref"], r
            assert r["local_shape"][0] == 2 and r["global_shape"][0] == 8


@pytest.mark.parametrize("mesh_shape", [(1, 2, 2), (2, 1, 2), (1, 1, 4)])
def test_tensor_parallel_gradients_equal_single_process(pool, mesh_shape):
    """Attention heads and dense FFN units split over "tp" (with experts over "ep" and FSDP2 over dp x ep): every
    gradient, the relative position bias's included, equals one process's."""
    for r in pool.run(_grad_parity, mesh_shape, "fsdp"):
        assert r["worst"] < 1e-9, r
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-9), r

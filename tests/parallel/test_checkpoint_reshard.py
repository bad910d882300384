"""Distributed checkpoints reshard across layouts: saved at ep=2 on 2 gloo ranks, read in this (plain) process with
no process group, saved again, and loaded at ep=4 and dp=2 x ep=2 (FSDP2 and DDP) on 4 ranks.

The reference is the trained model's own global state: every parameter and every optimizer state tensor gathered
whole (``full_tensor()``), named through ``optimizer.state_dict()``'s parameter order, not through the checkpoint
code. Every load must give back each tensor bitwise (``torch.equal``), and the parameter groups exactly.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist

from parallel.pool import WorkerPool
from switchformer import checkpoint as ck

BATCH, SEQ, VOCAB, EXPERTS, STEPS = 2, 8, 128, 4, 2


def _config():
    from switchformer.config import ModelConfig, MoEConfig

    return ModelConfig(
        vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2, num_decoder_layers=2,
        dropout_rate=0.0, encoder_sparse_step=1, decoder_sparse_step=2,
        moe=MoEConfig(num_experts=EXPERTS, capacity_factor=1.0, eval_capacity_factor=1.0, exploration="argmax",
                      router_input_dropout=0.0),
    )


def _optim_config(name: str):
    from switchformer.config import OptimConfig

    return OptimConfig(name=name, lr=1e-2, weight_decay=0.1)  # two parameter groups (decay / no decay)


def _config_toml(optim: str) -> str:
    from switchformer.config import RunConfig, to_toml

    return to_toml(RunConfig(model=_config(), optim=_optim_config(optim)))


def _build(optim: str, mesh_shape=None, dense="fsdp"):
    """The tiny model (and its optimizer), parallelized over a (dp, ep) mesh when ``mesh_shape`` is given."""
    from switchformer.models import build_model
    from switchformer.train.optim import build_optimizer

    torch.manual_seed(3)
    model = build_model(_config())
    if mesh_shape is not None:
        from torch.distributed.device_mesh import init_device_mesh

        from switchformer.distributed import parallelize

        names = ("dp", "ep") if len(mesh_shape) == 2 else ("ep",)
        model = parallelize(model, init_device_mesh("cpu", mesh_shape, mesh_dim_names=names), dense=dense)
    optimizer = build_optimizer(model, _optim_config(optim))
    if mesh_shape is not None and optim == "adafactor":  # as the distributed Trainer builds it
        from switchformer.train.parallel import ShardedAdafactor

        optimizer = ShardedAdafactor([dict(g) for g in optimizer.param_groups])
    return model, optimizer


def _global_state(model, optimizer) -> dict:
    """Every model and optimizer tensor, whole (collective for DTensors), named by parameter; and the groups."""
    from torch.distributed.tensor import DTensor

    from switchformer.distributed import unwrap

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t.detach().clone()

    inner = unwrap(model)
    names = {id(p): n for n, p in inner.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    osd = optimizer.state_dict()
    return {
        "model": {k: whole(v) for k, v in inner.state_dict().items()},
        "optim": {f"{order[i]}.{k}": whole(v) for i, s in osd["state"].items() for k, v in s.items()},
        "groups": [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]],
    }


def _assert_same(got: dict, ref: dict, what: str) -> None:
    for part in ("model", "optim"):
        assert got[part].keys() == ref[part].keys(), (what, part, got[part].keys() ^ ref[part].keys())
        differ = [k for k in ref[part] if got[part][k].dtype != ref[part][k].dtype
                  or not torch.equal(got[part][k], ref[part][k])]
        assert not differ, f"{what}: {part} tensors differ: {differ}"
    assert len(ref["optim"]) > len(ref["model"]), "the optimizer has state for every parameter"
    assert json.loads(json.dumps(got["groups"])) == json.loads(json.dumps(ref["groups"])), what


def _batch(rank: int, world: int, step: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(2, VOCAB, (world * BATCH, SEQ), generator=g)
    labels = torch.randint(2, VOCAB, (world * BATCH, SEQ), generator=g)
    dec = torch.cat([torch.zeros(world * BATCH, 1, dtype=torch.long), labels[:, :-1]], 1)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return {"input_ids": ids[rows], "decoder_input_ids": dec[rows], "labels": labels[rows]}


# ---------------------------------------------------------------------------------------------------- worker tasks
def _train_and_save(run_dir: str, mesh_shape, dense: str, optim: str) -> dict | None:
    from switchformer.distributed import reduce_expert_gradients, save_distributed_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    model, optimizer = _build(optim, mesh_shape, dense)
    for step in range(STEPS):
        model(**_batch(rank, world, step)).loss.backward()
        reduce_expert_gradients(model)
        optimizer.step()
        optimizer.zero_grad()
    save_distributed_checkpoint(run_dir, STEPS, model, optimizer, {"data": {"rank0": rank}}, _config_toml(optim),
                                keep=2)
    state = _global_state(model, optimizer)
    return state if rank == 0 else None


def _load_and_report(path: str, mesh_shape, dense: str, optim: str) -> dict | None:
    from switchformer.distributed import load_distributed_checkpoint

    model, optimizer = _build(optim, mesh_shape, dense)
    train_state = load_distributed_checkpoint(path, model, optimizer)
    state = _global_state(model, optimizer)
    state["step"] = train_state["step"]
    return state if dist.get_rank() == 0 else None


def _save_with_crash(run_dir: str) -> str:
    """Save step STEPS + 1 with rank 0 dying after every rank wrote its tensors, before the commit."""
    from switchformer.distributed import checkpoint as dck
    from switchformer.errors import CheckpointError

    model, optimizer = _build("adamw", (2,))
    real = dck.write_text_atomic

    def crash(path, text):
        if str(path).endswith(ck.STATE_FILE):
            raise OSError("simulated crash while writing train_state.json")
        real(path, text)

    dck.write_text_atomic = crash
    try:
        dck.save_distributed_checkpoint(run_dir, STEPS + 1, model, optimizer, {}, _config_toml("adamw"), keep=2)
    except CheckpointError as e:
        return str(e)
    finally:
        dck.write_text_atomic = real
    return "no error"


class _LocalStateSGD(torch.optim.Optimizer):
    """Keeps a plain per-rank copy of each parameter's local shard as state: what DCP would store once for all."""

    def __init__(self, params):
        super().__init__(params, {})

    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                local = p.to_local() if hasattr(p, "to_local") else p
                self.state[p]["copy"] = local.detach().clone()


def _save_local_state(run_dir: str) -> str:
    from switchformer.distributed import save_distributed_checkpoint
    from switchformer.errors import CheckpointError

    model, _ = _build("adamw", (2,))
    optimizer = _LocalStateSGD(model.parameters())
    optimizer.step()
    try:
        save_distributed_checkpoint(run_dir, 1, model, optimizer, {}, _config_toml("adamw"), keep=1)
    except CheckpointError as e:
        return str(e)
    return "no error"


# ---------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def pools():
    """A 2-rank and a 4-rank pool, each started on first use."""
    with WorkerPool(2) as two, WorkerPool(4) as four:
        yield {2: two, 4: four}


@pytest.fixture(scope="module")
def saved(pools, tmp_path_factory):
    """Trained and saved at ep=2 (2 ranks, FSDP2 dense); read here with no process group; saved again here as a
    distributed and as a single-process checkpoint."""
    from switchformer.distributed import save_distributed_checkpoint

    root = tmp_path_factory.mktemp("reshard")
    ref = pools[2].run(_train_and_save, str(root / "ep2"), (2,), "fsdp", "adamw")[0]

    assert not dist.is_initialized()
    model, optimizer = _build("adamw")
    loaded = ck.load_latest(root / "ep2", model, optimizer, restore_rng=False)
    plain = _global_state(model, optimizer)
    save_distributed_checkpoint(root / "plain-dcp", STEPS, model, optimizer, {}, _config_toml("adamw"), keep=1)
    ck.save_checkpoint(root / "plain-st", STEPS, model, optimizer, {}, _config_toml("adamw"), keep=1)
    return {"root": root, "ref": ref, "plain": plain, "loaded": loaded}


def test_ep2_checkpoint_loads_in_one_plain_process(saved):
    _assert_same(saved["plain"], saved["ref"], "ep=2 -> one process")
    loaded = saved["loaded"]
    assert loaded.step == STEPS and loaded.state["kind"] == "distributed"
    assert loaded.state["layout"] == {"dp": 1, "ep": 2, "dense": "fsdp"} and loaded.state["world_size"] == 2
    assert len(loaded.state["rng_ranks"]) == 2 and loaded.state["data"] == {"rank0": 0}


def test_metadata_holds_experts_at_global_size(saved):
    path = ck.latest_checkpoint(saved["root"] / "ep2")
    metadata = ck.dcp_reader(path / ck.DCP_DIR).read_metadata().state_dict_metadata
    experts = [k for k in metadata if ".experts." in k]
    assert experts and any(k.startswith("optim.") for k in experts)
    for key in experts:
        if key.endswith(".step"):
            continue
        md = metadata[key]
        assert md.size[0] == EXPERTS, (key, md.size)
        # one chunk per expert-parallel rank, at global expert offsets 0 and E/2
        assert sorted(c.offsets[0] for c in md.chunks) == [0, EXPERTS // 2], (key, md.chunks)
    files = sorted(p.name for p in (path / ck.DCP_DIR).iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    manifest = ck.verify_checkpoint(path)["manifest"]
    assert set(manifest) == {f"dcp/{n}" for n in files} | {"config.toml"}


@pytest.mark.parametrize("source, mesh_shape, dense", [
    ("plain-dcp", (4,), "fsdp"),     # ep=2 -> one process -> ep=4
    ("plain-dcp", (2, 2), "fsdp"),   # ... -> dp=2 x ep=2
    ("ep2", (2, 2), "ddp"),          # ep=2 -> dp=2 x ep=2 directly, DDP dense weights
    ("plain-st", (2, 2), "fsdp"),    # a single-process safetensors checkpoint into 4 ranks
])
def test_reshards_bitwise(pools, saved, source, mesh_shape, dense):
    got = pools[4].run(_load_and_report, str(saved["root"] / source), mesh_shape, dense, "adamw")[0]
    assert got.pop("step") == STEPS
    _assert_same(got, saved["ref"], f"{source} -> {mesh_shape} {dense}")


def test_adafactor_state_reshards(pools, tmp_path):
    """The distributed Trainer's Adafactor (statistics placed like their parameters) at ep=2 -> torch's Adafactor in
    one process -> ep=4 and dp=2 x ep=2 (DDP). Its factored statistics are per expert: [E, F, 1] and [E, 1, D]."""
    ref = pools[2].run(_train_and_save, str(tmp_path), (2,), "fsdp", "adafactor")[0]
    assert any(k.endswith("experts.w_in.row_var") and v.shape[0] == EXPERTS for k, v in ref["optim"].items())
    model, optimizer = _build("adafactor")
    assert type(optimizer) is torch.optim.Adafactor
    ck.load_latest(tmp_path, model, optimizer, restore_rng=False)
    _assert_same(_global_state(model, optimizer), ref, "adafactor ep=2 -> one process")
    for mesh_shape, dense in (((4,), "fsdp"), ((2, 2), "ddp")):
        got = pools[4].run(_load_and_report, str(tmp_path), mesh_shape, dense, "adafactor")[0]
        got.pop("step")
        _assert_same(got, ref, f"adafactor ep=2 -> {mesh_shape} {dense}")


def test_crash_mid_save_keeps_previous_checkpoint(pools, saved):
    run_dir = saved["root"] / "ep2"
    errors = pools[2].run(_save_with_crash, str(run_dir))
    assert all("simulated crash" in e for e in errors), errors  # every rank raised, none hung
    assert [p.name for p in ck.list_checkpoints(run_dir)] == [ck.step_dir_name(STEPS)]
    assert ck.latest_checkpoint(run_dir).name == ck.step_dir_name(STEPS)
    leftovers = [p for p in (run_dir / ck.CHECKPOINTS_DIR).iterdir() if p.name.startswith(".tmp_")]
    assert len(leftovers) == 1 and (leftovers[0] / ck.DCP_DIR / ".metadata").is_file()
    model, optimizer = _build("adamw")
    assert ck.load_latest(run_dir, model, optimizer).step == STEPS
    _assert_same(_global_state(model, optimizer), saved["ref"], "after a crashed save")
    # Once its writer is gone, the next start removes the leftover (here: renamed to a pid that cannot exist).
    dead = leftovers[0].with_name(f".tmp_{ck.step_dir_name(STEPS + 1)}_{2**31 - 1}")
    leftovers[0].rename(dead)
    assert ck.clean_incomplete(run_dir) == [dead] and not dead.exists()


def test_corrupted_shard_is_named_and_skipped(pools, saved, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(saved["root"] / "ep2", run_dir)
    good = ck.latest_checkpoint(run_dir)
    newer = good.parent / ck.step_dir_name(STEPS + 5)
    shutil.copytree(good, newer)
    (good.parent / ck.LATEST_FILE).write_text(newer.name)
    shard = newer / ck.DCP_DIR / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ck.CheckpointError, match="__1_0.distcp"):
        ck.verify_checkpoint(newer)
    model, _ = _build("adamw")
    with pytest.warns(UserWarning, match="__1_0.distcp"):
        assert ck.load_latest(run_dir, model).path == good
    # Four ranks hash a quarter of the files each (rank 3 finds this one) and fall back together.
    got = pools[4].run(_load_and_report, str(run_dir), (4,), "fsdp", "adamw")[0]
    assert got.pop("step") == STEPS
    _assert_same(got, saved["ref"], "fallback past a corrupted shard at ep=4")
    # Past the manifest (loading without verifying), a truncated data file is still a CheckpointError.
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ck.CheckpointError, match="could not be read .*rank 0"):
        ck.load_dcp_state(newer, ck.verify_checkpoint(good), model)


def test_wrong_model_is_refused(saved):
    from switchformer.config import ModelConfig
    from switchformer.models import build_model

    other = build_model(ModelConfig(vocab_size=VOCAB, d_model=16, d_ff=32, d_kv=4, num_heads=4, num_layers=2,
                                    num_decoder_layers=2))  # 8 experts: every expert tensor has another shape
    with pytest.raises(ck.CheckpointError, match="shapes differ"):
        ck.load_latest(saved["root"] / "ep2", other)


def test_eval_style_loading_of_a_distributed_run(saved):
    """``switchformer eval/generate RUN_DIR`` load through ``load_run``: one plain process."""
    from switchformer.train.runs import load_run

    run_dir = saved["root"] / "ep2"
    (run_dir / "config.toml").write_text(_config_toml("adamw"))
    run = load_run(run_dir)
    assert run.step == STEPS and not run.model.training
    got = run.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in saved["ref"]["model"].items())


def test_export_from_ep2_loads_with_from_pretrained(saved, tmp_path):
    import switchformer
    from switchformer.distributed import export_pretrained

    with pytest.warns(UserWarning, match="route differently"):  # capacity factors have no transformers field
        out = export_pretrained(saved["root"] / "ep2", tmp_path / "export", expert_capacity=64)
    ours = switchformer.from_pretrained(out)
    sd = ours.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in saved["ref"]["model"].items())
    transformers = pytest.importorskip("transformers")
    hf = transformers.SwitchTransformersForConditionalGeneration.from_pretrained(out).eval()
    # One sequence of 4 tokens: our capacity (min_capacity 4) and transformers' (64 per sequence) drop nothing, so
    # the two route alike (the export warns that capacity factors are not expressible in transformers' config).
    batch = {k: v[:1, :4] for k, v in _batch(0, 1, 7).items()}
    with torch.no_grad():
        out = ours(batch["input_ids"], labels=batch["labels"])
        theirs = hf(input_ids=batch["input_ids"], labels=batch["labels"]).logits
    assert sum(int(r.dropped_tokens) for r in out.router) == 0
    torch.testing.assert_close(out.logits, theirs, atol=1e-5, rtol=1.3e-6)


def test_plain_per_rank_expert_state_is_refused(pools, tmp_path):
    """Saved as plain tensors, rank 1's expert state would be dropped for rank 0's under the same name."""
    errors = pools[2].run(_save_local_state, str(tmp_path))
    assert all("plain per-rank tensors" in e and ".experts." in e for e in errors), errors
    assert not (tmp_path / ck.CHECKPOINTS_DIR).exists()  # refused before anything was written


def test_another_optimizer_is_refused(saved):
    model, optimizer = _build("adafactor")
    with pytest.raises(ck.CheckpointError, match="optimizer state the checkpoint lacks"):
        ck.load_latest(saved["root"] / "ep2", model, optimizer)

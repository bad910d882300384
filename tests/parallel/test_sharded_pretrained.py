"""``from_pretrained(path, mesh=...)`` against the single-process ``from_pretrained`` (4 gloo ranks).

Each rank must hold exactly its experts (rows [j*E/ep, (j+1)*E/ep) of the single-process model's stacked weights),
the same dense weights, and compute the same logits on its own sequences as the single-process model on all of
them (routing groups matched). What is read is checked at the file reader (every ``safe_open`` slice read is
recorded: only this rank's experts, each once), and the peak resident memory of a fresh process loading a
checkpoint whose experts dominate it is bounded by dense + E/ep experts + one tensor, well below the checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from parallel.pool import WorkerPool

WORLD = 4
E_HF, E_NATIVE = 16, 8
BATCH, SEQ, VOCAB = 2, 8, 64
MEMORY_MARGIN_BYTES = 8 * 2**20
"""Python objects, headers and allocator slack while loading (the checkpoint's experts are 48 MiB)."""


# ------------------------------------------------------------------------------------------------- checkpoints
def _write_hf(directory: Path) -> Path:
    """A transformers-format checkpoint in 8 MB shards whose 3 sparse layers x 16 experts (48 MiB) dominate it:
    written by transformers when installed, else by switchformer.save_pretrained in transformers' layout."""
    kw = dict(vocab_size=VOCAB, d_model=32, d_ff=4096, d_kv=8, num_heads=4, num_layers=2, num_decoder_layers=2,
              num_experts=E_HF, expert_capacity=SEQ, relative_attention_num_buckets=8,
              relative_attention_max_distance=20, dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0,
              eos_token_id=1)
    try:
        import transformers
    except ImportError:
        transformers = None
    if transformers is not None:
        torch.manual_seed(0)
        hf_cfg = transformers.SwitchTransformersConfig(**kw, num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
                                                       router_jitter_noise=0.0)
        model = transformers.SwitchTransformersForConditionalGeneration(hf_cfg)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer_norm" in name:  # norms start at one: perturbed, so that a swapped norm shows
                    p.uniform_(0.5, 1.5)
        model.save_pretrained(directory, max_shard_size="8MB")
    else:
        import switchformer
        from switchformer.config import ModelConfig, MoEConfig

        cfg = ModelConfig(vocab_size=VOCAB, d_model=32, d_ff=4096, d_kv=8, num_heads=4, num_layers=2,
                          num_decoder_layers=2, encoder_sparse_step=1, decoder_sparse_step=2, dropout_rate=0.0,
                          relative_attention_num_buckets=8, relative_attention_max_distance=20,
                          moe=MoEConfig(num_experts=E_HF, expert_capacity=SEQ))
        switchformer.save_pretrained(switchformer.build_model(cfg), directory, max_shard_size="8MB", format="hf")
    return directory


def _write_native(directory: Path) -> Path:
    """A switchformer-native checkpoint (decoder-only, gated experts: stacked [E, ...] tensors), capacity routing
    with groups of one rank's tokens."""
    import switchformer
    from switchformer.config import ModelConfig, MoEConfig

    cfg = ModelConfig(arch="decoder_only", vocab_size=VOCAB, d_model=16, d_ff=64, d_kv=4, num_heads=4, num_layers=2,
                      encoder_sparse_step=1, decoder_sparse_step=1, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                      moe=MoEConfig(num_experts=E_NATIVE, capacity_factor=1.0, eval_capacity_factor=1.0,
                                    group_size=BATCH * SEQ, router_input_dropout=0.0))
    torch.manual_seed(1)
    switchformer.save_pretrained(switchformer.build_model(cfg), directory, format="native", max_shard_size="40KB")
    return directory


def _write_pickle(source: Path, directory: Path) -> Path:
    """The same transformers checkpoint as one pickled ``pytorch_model.bin`` (zip format, as torch.save writes)."""
    from safetensors.torch import load_file

    directory.mkdir()
    tensors = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    torch.save(tensors, directory / "pytorch_model.bin")
    (directory / "config.json").write_text((source / "config.json").read_text())
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded_pretrained")
    hf = _write_hf(root / "hf")
    return {"hf": str(hf), "native": str(_write_native(root / "native")),
            "pickle": str(_write_pickle(hf, root / "pickle"))}


@pytest.fixture(scope="module")
def pool(checkpoints):
    """The worker pool; its first task, in fresh processes, measures the peak memory of a sharded load."""
    with WorkerPool(WORLD) as p:
        p.first_load_memory = p.run(_peak_memory, checkpoints["hf"])
        yield p


# ------------------------------------------------------------------------------------------------- helpers
def _mesh(names, shape):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", shape, mesh_dim_names=names)


def _local_rows(mesh, num_experts: int) -> slice:
    if "ep" not in mesh.mesh_dim_names:
        return slice(0, num_experts)
    per = num_experts // mesh.size(mesh.mesh_dim_names.index("ep"))
    j = mesh.get_local_rank("ep")
    return slice(j * per, (j + 1) * per)


def _header(path: str) -> dict[str, tuple[str, int]]:
    """``{tensor name: (file, bytes)}`` of a checkpoint directory, from the safetensors headers alone."""
    from safetensors import safe_open

    d = Path(path)
    index = d / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(d / name), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118
                s = h.get_slice(k)
                numel = 1
                for n in s.get_shape():
                    numel *= n
                out[k] = (name, numel * {"F32": 4, "F64": 8, "BF16": 2, "F16": 2}[s.get_dtype()])
    return out


def _expert_index(key: str) -> int | None:
    import re

    m = re.search(r"\.experts\.expert_(\d+)\.", key)
    return int(m[1]) if m else None


class _RecordingOpen:
    """Wraps ``safetensors.safe_open``: every tensor or slice read is recorded as (key, rows, bytes)."""

    reads: list = []

    def __init__(self, *args, **kwargs):
        self._h = _RecordingOpen.real(*args, **kwargs)

    def __enter__(self):
        self._h.__enter__()
        return self

    def __exit__(self, *exc):
        return self._h.__exit__(*exc)

    def keys(self):
        return self._h.keys()

    def metadata(self):
        return self._h.metadata()

    def get_tensor(self, key):
        t = self._h.get_tensor(key)
        _RecordingOpen.reads.append((key, None, t.numel() * t.element_size()))
        return t

    def get_slice(self, key):
        return _RecordingSlice(self._h.get_slice(key), key)


class _RecordingSlice:
    def __init__(self, part, key):
        self._part, self._key = part, key

    def get_shape(self):
        return self._part.get_shape()

    def get_dtype(self):
        return self._part.get_dtype()

    def __getitem__(self, index):
        t = self._part[index]
        rows = (index.start, index.stop) if isinstance(index, slice) and index != slice(None) else None
        _RecordingOpen.reads.append((self._key, rows, t.numel() * t.element_size()))
        return t


# ------------------------------------------------------------------------------------------------- worker tasks
def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _peak_memory(path: str):
    """Peak resident memory growth of this (fresh) process while loading ``path`` at ep=4: the high-water mark is
    reset just before the call (``/proc/self/clear_refs``), after the imports and the mesh."""
    import torch.distributed.fsdp  # noqa: F401  (imported by parallelize; not part of the load)

    import switchformer
    import switchformer.distributed.pretrained  # noqa: F401
    from switchformer.config import ModelConfig, MoEConfig

    # The first model built in a process imports modules (~25 MB, once per process, whatever the model's size).
    switchformer.build_model(ModelConfig(vocab_size=8, d_model=8, d_ff=8, d_kv=2, num_heads=4, num_layers=2,
                                         num_decoder_layers=2, moe=MoEConfig(num_experts=2)), init=False,
                             device="meta")
    mesh = _mesh(("ep",), (WORLD,))
    header = _header(path)
    rows = _local_rows(mesh, E_HF)
    dense = sum(b for k, (_, b) in header.items() if _expert_index(k) is None)
    mine = sum(b for k, (_, b) in header.items() if _expert_index(k) in range(rows.start, rows.stop))
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux)
        ok = True
    except OSError:  # not Linux, or not allowed here: no measurement
        ok = False
    ok = all(_gather_flags(ok))  # every rank loads below either way (the loading has collectives)
    dist.barrier()
    if ok:
        Path("/proc/self/clear_refs").write_text("5")
        before = _status_bytes("VmRSS")
    model = switchformer.from_pretrained(path, mesh=mesh)
    if ok:
        peak = _status_bytes("VmHWM") - before
    del model
    if not ok:
        return None
    return {"peak": peak, "dense": dense, "mine": mine, "largest": max(b for _, b in header.values()),
            "total": sum(b for _, b in header.values())}


def _gather_flags(flag: bool) -> list[bool]:
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, flag)
    return every


def _reads(kind: str, path: str, names, shape):
    """Load through a recording ``safe_open``: which tensors and rows this rank read, and how many bytes."""
    import safetensors

    import switchformer

    mesh = _mesh(names, shape)
    _RecordingOpen.real, _RecordingOpen.reads = safetensors.safe_open, []
    safetensors.safe_open = _RecordingOpen
    try:
        switchformer.from_pretrained(path, mesh=mesh)
    finally:
        safetensors.safe_open = _RecordingOpen.real
    num_experts = E_HF if kind == "hf" else E_NATIVE
    rows = _local_rows(mesh, num_experts)
    return {"reads": list(_RecordingOpen.reads), "header": _header(path), "rows": (rows.start, rows.stop)}


def _inputs(kind: str):
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(2, VOCAB, (WORLD * BATCH, SEQ), generator=g)
    if kind == "native":
        return {"input_ids": ids}
    dec = torch.randint(2, VOCAB, (WORLD * BATCH, SEQ), generator=g)
    return {"input_ids": ids, "decoder_input_ids": dec}


def _parity(kind: str, path: str, names, shape, dense: str, dtype_name: str | None = None):
    """The sharded model against the single-process one: experts, dense weights, logits."""
    from torch.distributed.tensor import DTensor

    import switchformer
    from switchformer.distributed import parallel_state, switch_layers, unwrap

    dtype = getattr(torch, dtype_name) if dtype_name else None
    ref = switchformer.from_pretrained(path, dtype=dtype)
    mesh = _mesh(names, shape)
    model = switchformer.from_pretrained(path, mesh=mesh, dense=dense, dtype=dtype)
    inner = unwrap(model)
    state = parallel_state(model)
    rows = _local_rows(mesh, ref.config.moe.num_experts)
    ref_params = dict(ref.named_parameters())

    experts_ok, expert_shapes, dense_ok, dtypes = True, set(), True, set()
    for name, p in inner.named_parameters():
        dtypes.add(p.dtype)
        if name in state.expert_names:  # ep > 1: this rank's rows of a DTensor [E, ...]
            local = p.to_local()
            expert_shapes.add((tuple(p.shape), tuple(local.shape)))
            experts_ok &= torch.equal(local, ref_params[name][rows])
        else:  # dense weights (and experts without "ep"): FSDP2 shards or DDP replicas of the whole tensor
            full = p.full_tensor() if isinstance(p, DTensor) else p
            dense_ok &= torch.equal(full, ref_params[name])
    n_layers = len(switch_layers(inner))
    batch = _inputs(kind)
    rank = dist.get_rank()
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    with torch.no_grad():
        want = ref(**batch).logits[mine]
        got = model(**{k: v[mine] for k, v in batch.items()}).logits
    return {"experts_ok": experts_ok, "dense_ok": dense_ok, "expert_shapes": sorted(expert_shapes),
            "layers": n_layers, "expert_params": len(state.expert_params), "ep": state.ep, "dp": state.dp,
            "err": float((got - want).abs().max()), "scale": float(want.abs().max()),
            "dtypes": sorted(str(d) for d in dtypes), "training": inner.training,
            "source": str(inner.weights_source.directory)}


def _hub_id_resolves_like_one_process(path: str):
    """A Hub id: the mesh path asks the Hub for the same files as the single-process path (offline: the Hub API is
    replaced by one that serves ``path``)."""
    from types import SimpleNamespace

    import switchformer
    import switchformer.interop.hub as hub

    calls = []

    class OfflineApi:
        def list_repo_files(self, repo_id, revision=None):
            calls.append(("list", repo_id, revision))
            return sorted(p.name for p in Path(path).iterdir())

        def snapshot_download(self, repo_id, **kwargs):
            calls.append(("download", repo_id, tuple(sorted(kwargs.get("allow_patterns") or ())),
                          kwargs.get("revision")))
            return path

    mesh = _mesh(("ep",), (WORLD,))
    real = hub.hub_api
    hub.hub_api = lambda: OfflineApi()
    try:
        ref = switchformer.from_pretrained("tiny-org/tiny-switch", revision="v1")
        one_process = list(calls)
        calls.clear()
        model = switchformer.from_pretrained("tiny-org/tiny-switch", mesh=mesh, revision="v1")
    finally:
        hub.hub_api = real
    from switchformer.distributed import unwrap

    inner = unwrap(model)
    w_in = inner.encoder.block[0].layer[1].mlp.experts.w_in
    same = torch.equal(w_in.to_local(), ref.encoder.block[0].layer[1].mlp.experts.w_in[_local_rows(mesh, E_HF)])
    return SimpleNamespace(one_process=one_process, mesh=list(calls), same=same,
                           repo=inner.weights_source.repo_id).__dict__


def _errors(path: str):
    """Clear errors: a mesh with other names, device= with a mesh, one rank failing to read, pre-sharded experts
    with another layout."""
    from torch.distributed.tensor import DTensor, Replicate

    import switchformer
    from switchformer.distributed import parallelize
    from switchformer.moe import SwitchFFN

    out = {}
    try:
        switchformer.from_pretrained(path, mesh=_mesh(("data", "expert"), (2, 2)))
    except Exception as e:  # noqa: BLE001 - the message is the result
        out["names"] = f"{type(e).__name__}: {e}"
    try:
        switchformer.from_pretrained(path, mesh=_mesh(("ep",), (WORLD,)), device="cpu")
    except TypeError as e:
        out["device"] = str(e)
    mesh = _mesh(("ep",), (WORLD,))
    try:  # one rank cannot read the checkpoint: it raises its error, the others name it instead of hanging
        switchformer.from_pretrained(path if dist.get_rank() != 1 else path + "-missing", mesh=mesh)
    except Exception as e:  # noqa: BLE001
        out["one_rank"] = f"{type(e).__name__}: {e}"
    layer = SwitchFFN(8, 16, 4)
    layer.experts.w_in = torch.nn.Parameter(DTensor.from_local(layer.experts.w_in.detach(), mesh, [Replicate()]))
    try:
        parallelize(layer, mesh, dense="none")
    except Exception as e:  # noqa: BLE001
        out["placements"] = f"{type(e).__name__}: {e}"
    return out


# ------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("names,shape,dense", [(("ep",), (4,), "fsdp"), (("dp", "ep"), (2, 2), "fsdp"),
                                               (("dp", "ep"), (2, 2), "ddp"), (("dp", "ep"), (4, 1), "fsdp")])
def test_transformers_checkpoint_matches_one_process(pool, checkpoints, names, shape, dense):
    ep = dict(zip(names, shape, strict=True)).get("ep", 1)
    for r in pool.run(_parity, "hf", checkpoints["hf"], names, shape, dense):
        assert r["experts_ok"] and r["dense_ok"], r
        assert r["layers"] == 3 and r["ep"] == ep, r
        if ep > 1:  # every expert weight a DTensor of global shape [E, ...] holding E/ep rows here
            assert r["expert_params"] == 6 and r["expert_shapes"] == [((E_HF, 32, 4096), (E_HF // ep, 32, 4096)),
                                                                      ((E_HF, 4096, 32), (E_HF // ep, 4096, 32))], r
        assert r["err"] <= 1e-5 * r["scale"] and r["scale"] > 0, r
        assert not r["training"] and r["source"] == checkpoints["hf"], r


def test_pickled_checkpoint_matches_one_process(pool, checkpoints):
    """pytorch_model.bin (read through torch.load(weights_only=True, mmap=True)): each rank copies its rows only."""
    for r in pool.run(_parity, "hf", checkpoints["pickle"], ("dp", "ep"), (2, 2), "fsdp"):
        assert r["experts_ok"] and r["dense_ok"] and r["expert_params"] == 6, r
        assert r["err"] <= 1e-5 * r["scale"] and r["source"] == checkpoints["pickle"], r


def test_native_checkpoint_float64_matches_one_process(pool, checkpoints):
    for r in pool.run(_parity, "native", checkpoints["native"], ("ep",), (4,), "fsdp", "float64"):
        assert r["experts_ok"] and r["dense_ok"], r
        # gated experts: w_in, w_gate [E, F, M] and w_out [E, M, F], 2 rows per rank
        assert r["layers"] == 2 and r["expert_params"] == 6, r
        assert ((E_NATIVE, 64, 16), (2, 64, 16)) in r["expert_shapes"], r
        assert r["dtypes"] == ["torch.float64"], r
        assert r["err"] <= 1e-12 * r["scale"], r


@pytest.mark.parametrize("kind,names,shape", [("hf", ("ep",), (4,)), ("hf", ("dp", "ep"), (2, 2)),
                                              ("native", ("ep",), (4,))])
def test_each_rank_reads_only_its_experts(pool, checkpoints, kind, names, shape):
    results = pool.run(_reads, kind, checkpoints[kind], names, shape)
    for r in results:
        lo, hi = r["rows"]
        header = r["header"]
        data_reads = [(k, rows, n) for k, rows, n in r["reads"]]
        keys = [k for k, _, _ in data_reads]
        assert len(keys) == len(set(keys)), "a tensor was read twice"
        if kind == "hf":
            experts_read = {_expert_index(k) for k in keys} - {None}
            assert experts_read == set(range(lo, hi)), (experts_read, lo, hi)
            assert all(rows is None for _, rows, _ in data_reads)
            expected = sum(b for k, (_, b) in header.items() if _expert_index(k) in (None, *range(lo, hi)))
        else:
            stacked = {k: rows for k, rows, _ in data_reads if ".experts.w_" in k}
            assert len(stacked) == 6 and set(stacked.values()) == {(lo, hi)}, stacked
            expected = sum(b * ((hi - lo) / E_NATIVE if ".experts.w_" in k else 1) for k, (_, b) in header.items())
        assert sum(n for _, _, n in data_reads) == expected, (sum(n for _, _, n in data_reads), expected)
    # together the ranks read every expert of the checkpoint (dp replicas read the same ones)
    if kind == "hf":
        assert set().union(*({_expert_index(k) for k, _, _ in r["reads"]} for r in results)) - {None} == set(
            range(E_HF))


def test_peak_memory_is_dense_plus_own_experts(pool):
    if None in pool.first_load_memory:
        pytest.skip("the peak resident memory cannot be reset here (/proc/self/clear_refs)")
    for r in pool.first_load_memory:
        bound = r["dense"] + r["mine"] + r["largest"] + MEMORY_MARGIN_BYTES
        assert r["mine"] * 4 == r["total"] - r["dense"], r  # the checkpoint: dense + 4 ranks' experts
        assert r["peak"] < bound, {k: v / 2**20 for k, v in r.items()}
        assert r["peak"] < r["total"] / 2, {k: v / 2**20 for k, v in r.items()}


def test_hub_id_downloads_what_one_process_downloads(pool, checkpoints):
    for r in pool.run(_hub_id_resolves_like_one_process, checkpoints["hf"]):
        assert r["one_process"] and r["mesh"] == r["one_process"], r
        assert r["same"] and r["repo"] == "tiny-org/tiny-switch", r


def test_clear_errors(pool, checkpoints):
    results = pool.run(_errors, checkpoints["native"])
    assert results[1]["one_rank"].startswith("FileNotFoundError") and "-missing" in results[1]["one_rank"]
    for r in results[:1] + results[2:]:
        assert r["one_rank"].startswith("CheckpointError: rank(s) [1] failed"), r
    for r in results:
        assert "ConfigError" in r["names"] and "mesh_dim_names" in r["names"], r
        assert "device" in r["device"] and "mesh" in r["device"], r
        assert "ConfigError" in r["placements"] and "Shard(dim=0)" in r["placements"], r

"""Expert parallelism on CPU gloo: tokens/s at ep=1 and ep=2, all-to-all bytes and time share, and how
``switchformer plan`` predicts the ep=2 step once calibrated for this machine.

    python benchmarks/bench_distributed.py             # 7 interleaved repetitions of 3 steps each
    python benchmarks/bench_distributed.py --quick     # a smoke run (2 repetitions of 1 step)

Two spawned gloo processes, one thread each, train the same small Switch encoder-decoder (d_model 256, d_ff 1024,
E = 8, two blocks per stack with a Switch layer in each, span-corruption lengths 128 + 29, random tokens) on the
same global batch of 16 sequences:

- **ep1**: rank 0 alone trains the plain model on all 16 sequences (rank 1 waits at a barrier);
- **plain_half**: each rank trains its own plain model on its 8 sequences, no communication at all (the compute
  of an ep=2 step without its parallel machinery: the reference for the plan's second calibration);
- **ep2_capacity / ep2_dropless**: ``parallelize`` shards the experts over both ranks (FSDP2 for the dense weights),
  each rank trains on 8 sequences; capacity mode exchanges fixed [E, C, d_model] buffers, dropless the routed
  tokens only.

A step is forward + backward (+ the expert-gradient reduction) + an AdamW update (torch's Adafactor
fails on FSDP2-sharded 2-D weights: its column norm over the sharded dimension is an in-place op on a partial
DTensor). The modes alternate within
every repetition; times are medians over repetitions. The all-to-all's share of the step is the time spent inside
the dispatcher's collectives (forward exchanges, their backward, and dropless's count exchange), measured on
rank 0. Bytes per step are the dispatcher's ``last_bytes_sent`` (one direction, per Switch layer) x 4 (dispatch
and combine, forward and backward), against the minimum: the [E, G*C, d_model] buffer in capacity mode, the routed
tokens in dropless mode.

Calibration for ``switchformer plan``: the matmul FLOP/s of one process while the other also multiplies (both
cores busy, the model's FFN shapes), and the gloo all-to-all's latency (an 8-element exchange) and bandwidth (a
capacity-sized buffer). The plan's estimate of the ep=2 capacity step with these numbers is reported beside the
measurement, and again with a second calibration of the compute rate: the FLOP/s the plain ep=1 model achieves
(which includes the work the FLOP count leaves out: norms, softmax, routing, the optimizer).

Writes ``benchmarks/results/distributed_cpu_<date>.{md,json,toml}`` (the .toml is the model recipe, so the plan
command in the report can be rerun). The machine may be shared with other work: read ratios from one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

MODES = ("ep1", "plain_half", "ep2_capacity", "ep2_dropless")
GLOBAL_SEQUENCES = 16
INPUT_LENGTH = 128
VOCAB = 8192


def run_config():
    from switchformer.config import (
        DataConfig,
        ModelConfig,
        MoEConfig,
        OptimConfig,
        ParallelConfig,
        RunConfig,
        TrainConfig,
    )

    model = ModelConfig(
        vocab_size=VOCAB, d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=2, num_decoder_layers=2,
        encoder_sparse_step=2, decoder_sparse_step=2, dropout_rate=0.0, moe=MoEConfig(num_experts=8),
    )
    return RunConfig(name="bench-distributed", model=model,
                     data=DataConfig(vocab_size=VOCAB, input_length=INPUT_LENGTH),
                     train=TrainConfig(batch_size=GLOBAL_SEQUENCES, precision="float32"),
                     optim=OptimConfig(name="adamw", lr=1e-3),
                     parallel=ParallelConfig(ep=2))


# ------------------------------------------------------------------------------------------------ timing hooks
class _A2ATimer:
    """Seconds spent inside the dispatcher's collectives (forward calls, their backward, count exchanges)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.enabled = False


def _install_timers(timer: _A2ATimer) -> None:
    import torch.distributed as dist
    from torch.distributed import _functional_collectives as funcol

    from switchformer.distributed import dispatch

    original = dispatch._all_to_all

    class _BackwardStart(torch.autograd.Function):
        """Identity on the exchange's output; its backward marks when the exchange's backward begins."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            timer.backward_start = time.perf_counter()
            return grad

    class _BackwardEnd(torch.autograd.Function):
        """Identity on the exchange's input; its backward marks when the exchange's backward has finished."""

        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            if isinstance(grad, funcol.AsyncCollectiveTensor):
                grad = funcol.wait_tensor(grad)
            if timer.enabled and getattr(timer, "backward_start", None) is not None:
                timer.seconds += time.perf_counter() - timer.backward_start
                timer.backward_start = None
            return grad

    def timed_all_to_all(x, output_splits, input_splits, group):
        x = _BackwardEnd.apply(x) if x.requires_grad else x
        start = time.perf_counter()
        out = original(x, output_splits, input_splits, group)
        if timer.enabled:
            timer.seconds += time.perf_counter() - start
        return _BackwardStart.apply(out) if out.requires_grad else out

    class _TimedDist:
        """torch.distributed for the dispatcher module, with its count exchange (all_to_all_single) timed."""

        def __getattr__(self, name):
            return getattr(dist, name)

        @staticmethod
        def all_to_all_single(*args, **kwargs):
            start = time.perf_counter()
            out = dist.all_to_all_single(*args, **kwargs)
            if timer.enabled:
                timer.seconds += time.perf_counter() - start
            return out

    dispatch._all_to_all = timed_all_to_all
    dispatch.dist = _TimedDist()


# ------------------------------------------------------------------------------------------------------ worker
def _batch(cfg, sequences: int, target_length: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, cfg.vocab_size, (sequences, INPUT_LENGTH), generator=g)
    labels = torch.randint(2, cfg.vocab_size, (sequences, target_length), generator=g)
    return ids, labels


def _saved_bytes(model, ids, labels) -> int:
    """Bytes autograd keeps for the backward of one training forward (each storage once; weights, their gathered
    FSDP copies and the experts' local shards excluded)."""
    from torch.distributed.tensor import DTensor

    def storages():
        return {(p.to_local() if isinstance(p, DTensor) else p).untyped_storage().data_ptr()
                for p in model.parameters()}

    weights = storages()
    seen: dict[int, int] = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):  # leaves that require grad are weights
            ptr = t.untyped_storage().data_ptr()
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(input_ids=ids, labels=labels)
    weights |= storages()  # after the forward FSDP's parameters are the gathered (unsharded) ones
    saved = sum(nbytes for ptr, nbytes in seen.items() if ptr not in weights)
    out.loss.backward()  # FSDP and the all-to-all expect the backward of every forward
    return saved


def _worker(rank: int, world: int, init_file: str, out_file: str, reps: int, steps: int) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from switchformer.data.span_corruption import span_corruption_lengths
    from switchformer.distributed import parallelize, reduce_expert_gradients, switch_layers
    from switchformer.models import build_model

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=120))
    timer = _A2ATimer()
    _install_timers(timer)
    cfg = run_config().model
    _, target_length = span_corruption_lengths(INPUT_LENGTH)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))

    models, optims, batches = {}, {}, {}
    torch.manual_seed(0)
    if rank == 0:
        models["ep1"] = build_model(cfg).train()
        batches["ep1"] = _batch(cfg, GLOBAL_SEQUENCES, target_length, seed=0)
    torch.manual_seed(0)
    models["plain_half"] = build_model(cfg).train()
    ids, labels = _batch(cfg, GLOBAL_SEQUENCES, target_length, seed=0)
    half = GLOBAL_SEQUENCES // world
    batches["plain_half"] = (ids[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
    for mode, factor in (("ep2_capacity", 1.25), ("ep2_dropless", None)):
        mcfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=factor))
        torch.manual_seed(0)
        models[mode] = parallelize(build_model(mcfg).train(), mesh, dense="fsdp")
        ids, labels = _batch(cfg, GLOBAL_SEQUENCES, target_length, seed=0)
        half = GLOBAL_SEQUENCES // world
        batches[mode] = (ids[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
    for mode, model in models.items():
        optims[mode] = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(mode):
        model, optim = models[mode], optims[mode]
        ids, labels = batches[mode]
        out = model(input_ids=ids, labels=labels)
        out.loss.backward()
        if mode.startswith("ep2"):
            reduce_expert_gradients(model)
        optim.step()
        optim.zero_grad(set_to_none=True)

    def bytes_per_step(mode):
        layers = switch_layers(models[mode])
        return 4 * sum(layer.dispatcher.last_bytes_sent for _, layer in layers)

    # calibration: matmul FLOP/s with both processes multiplying at once; gloo all-to-all latency and bandwidth
    tokens_per_rank = GLOBAL_SEQUENCES // world * INPUT_LENGTH
    a, b = torch.randn(tokens_per_rank, cfg.d_model), torch.randn(cfg.d_model, cfg.d_ff)
    flops_samples = []
    for _ in range(7):
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(10):
            torch.mm(a, b)
        flops_samples.append(10 * 2 * a.shape[0] * a.shape[1] * b.shape[1] / (time.perf_counter() - t0))
    small, large = torch.zeros(8 * world), torch.randn(4 * 2**20)  # 8 floats; 16 MB
    lat_samples, a2a_samples = [], []
    for _ in range(7):
        for buf, samples, calls in ((small, lat_samples, 50), (large, a2a_samples, 5)):
            recv = torch.empty_like(buf)
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(calls):
                dist.all_to_all_single(recv, buf)
            samples.append((time.perf_counter() - t0) / calls)
    # what one collective costs after a stretch of compute (~0.1 s of matmuls, as between a step's collectives):
    # the peer may be behind, descheduled or still computing; on a busy machine this dominates the wire latency
    mm_per_chunk = max(1, int(0.1 * statistics.median(flops_samples) / (2 * a.shape[0] * a.shape[1] * b.shape[1])))
    recv_small = torch.empty_like(small)
    sync_samples = {False: [], True: []}
    for rep in range(7):
        for with_collective in ((False, True) if rep % 2 else (True, False)):
            dist.barrier()
            t0 = time.perf_counter()
            for _ in range(5):
                for _ in range(mm_per_chunk):
                    torch.mm(a, b)
                if with_collective:
                    dist.all_to_all_single(recv_small, small)
            sync_samples[with_collective].append((time.perf_counter() - t0) / 5)

    # warm-up (allocator, first-call checks), then interleaved repetitions
    for mode in MODES:
        if mode == "ep1":
            if rank == 0:
                step(mode)
            dist.barrier()
        else:
            step(mode)
    times = {m: [] for m in MODES}
    a2a_seconds = {m: [] for m in MODES if m.startswith("ep2")}
    sent = {}
    for rep in range(reps):
        order = MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]
        for mode in order:
            dist.barrier()
            timer.seconds, timer.enabled = 0.0, True
            t0 = time.perf_counter()
            if mode == "ep1":
                if rank == 0:
                    for _ in range(steps):
                        step(mode)
            else:
                for _ in range(steps):
                    step(mode)
            elapsed = time.perf_counter() - t0
            timer.enabled = False
            dist.barrier()
            times[mode].append(elapsed / steps)
            if mode.startswith("ep2"):
                a2a_seconds[mode].append(timer.seconds / steps)
                sent[mode] = bytes_per_step(mode)
    # activation memory: bytes of the tensors autograd saves in one forward (weights excluded), per mode
    saved = {}
    for mode in MODES:
        if mode == "ep1" and rank != 0:
            dist.barrier()
            continue
        saved[mode] = _saved_bytes(models[mode], *batches[mode])
        optims[mode].zero_grad(set_to_none=True)
        if mode == "ep1":
            dist.barrier()
    if rank == 0:
        # the minimum bytes of one step, from the routing of the last step on this rank
        from switchformer.distributed.plan import _capacity_rows

        d, elem = cfg.d_model, 4
        enc_tokens = GLOBAL_SEQUENCES // world * INPUT_LENGTH
        dec_tokens = GLOBAL_SEQUENCES // world * target_length
        capacity_min = 4 * d * elem * (_capacity_rows(cfg, enc_tokens, INPUT_LENGTH)[0]
                                       + _capacity_rows(cfg, dec_tokens, target_length)[0])
        dropless_min = 4 * d * elem * (enc_tokens + dec_tokens)  # every token routed once, none dropped
        result = {
            "times_s": times, "a2a_seconds": a2a_seconds, "bytes_per_step": sent,
            "min_bytes_per_step": {"ep2_capacity": capacity_min, "ep2_dropless": dropless_min},
            "matmul_flops": flops_samples, "a2a_latency_s": lat_samples, "a2a_large_s": a2a_samples,
            "chunk_s": sync_samples[False], "chunk_and_collective_s": sync_samples[True],
            "saved_activation_bytes": saved,
            "a2a_large_bytes": large.numel() * 4, "target_length": target_length,
            "tokens_per_step": GLOBAL_SEQUENCES * (INPUT_LENGTH + target_length),
        }
        Path(out_file).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------------ report
def _median(xs):
    return statistics.median(xs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="steps timed per repetition and mode")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.quick:
        args.reps, args.steps = 2, 1

    import torch.multiprocessing as mp

    from switchformer.config import to_toml
    from switchformer.distributed import plan

    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out_file = os.path.join(tmp, "init"), os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(2, init_file, out_file, args.reps, args.steps), nprocs=2, join=True)
        r = json.loads(Path(out_file).read_text())
    wall = time.time() - started

    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"distributed_cpu_{date}{'_quick' if args.quick else ''}"
    toml_path = stem.with_suffix(".toml")
    toml_path.write_text(to_toml(run_config()))

    tokens = r["tokens_per_step"]
    step = {m: _median(v) for m, v in r["times_s"].items()}
    flops = _median(r["matmul_flops"])
    latency = _median(r["a2a_latency_s"])
    large_time = _median(r["a2a_large_s"])
    # half of the buffer leaves the rank; the wire latency is subtracted (a noisy machine can invert the two)
    bandwidth = r["a2a_large_bytes"] / 2 / (large_time - latency if large_time > 2 * latency else large_time)
    sync_cost = max(_median(r["chunk_and_collective_s"]) - _median(r["chunk_s"]), latency)

    model_cfg, work = plan.workload_from_run_config(run_config(), target_length=r["target_length"])
    hw_peak = plan.Hardware(devices=2, device_memory=64e9, link_bandwidth=bandwidth, device_flops=flops,
                            link_latency=latency)
    ep2 = plan.Layout(dp=1, ep=2, tp=1)
    est_peak = plan.plan_layout(model_cfg, ep2, hw_peak, work)
    # second calibration: the compute rate the plain model achieves, one process per core, each on half the batch
    # with no communication (the plain_half mode): everything the FLOP count leaves out is folded into it
    half_work = dataclasses.replace(work, tokens_per_batch=work.tokens_per_batch // 2)
    half_plan = plan.plan_layout(model_cfg, plan.Layout(dp=1, ep=1, tp=1), dataclasses.replace(hw_peak, devices=1),
                                 half_work)
    achieved = 3 * half_plan.details["forward_flops_per_device"] / step["plain_half"]
    hw_model = dataclasses.replace(hw_peak, device_flops=achieved, link_latency=sync_cost)
    est_model = plan.plan_layout(model_cfg, ep2, hw_model, work)
    dropless_work = dataclasses.replace(work, routing="dropless")
    est_dropless = plan.plan_layout(model_cfg, ep2, hw_model, dropless_work)

    rel = lambda est, meas: est / meas - 1  # noqa: E731
    rows = []
    for mode in MODES:
        share = (_median(r["a2a_seconds"][mode]) / step[mode]) if mode.startswith("ep2") else 0.0
        sent = r["bytes_per_step"].get(mode)
        minimum = r["min_bytes_per_step"].get(mode)
        rows.append((mode, step[mode], tokens / step[mode], share, sent, minimum))
    shown_path = os.path.relpath(toml_path, Path(__file__).resolve().parents[1])
    cmd_peak = (f"switchformer plan {Path(shown_path).as_posix()} --devices 2 --max-tp 1 --device-flops {flops:.4g} "
                f"--link-bandwidth {bandwidth:.4g} --link-latency {latency:.3g} --device-memory 64GB")
    cmd_model = cmd_peak.replace(f"--device-flops {flops:.4g}", f"--device-flops {achieved:.4g}").replace(
        f"--link-latency {latency:.3g}", f"--link-latency {sync_cost:.3g}")
    load = os.getloadavg()
    md = [
        f"# Expert parallelism on CPU gloo ({date})",
        "",
        f"`python benchmarks/bench_distributed.py{' --quick' if args.quick else ''}`: {args.reps} interleaved "
        f"repetitions x {args.steps} steps per mode; medians. Wall time {wall:.0f} s. Machine: {platform.machine()}, "
        f"{os.cpu_count()} cores shared with other agents' work (load average at the end {load[0]:.1f} / "
        f"{load[1]:.1f} / {load[2]:.1f}), torch {torch.__version__}, 1 thread per process, gloo.",
        "",
        f"Model: encoder-decoder, d_model 256, d_ff 1024, 4 heads x 64, 2 + 2 blocks, a Switch layer (E = 8, "
        f"capacity factor 1.25) in each stack, vocabulary {VOCAB}, float32; global batch {GLOBAL_SEQUENCES} "
        f"sequences of {INPUT_LENGTH} + {r['target_length']} tokens ({tokens} tokens per step); AdamW. Recipe: "
        f"`{toml_path.name}`.",
        "",
        "| mode | step (s) | tokens/s | vs ep=1 | all-to-all share of step | all-to-all bytes/step (rank 0) | "
        "minimum | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for mode, s, tps, share, sent, minimum in rows:
        ratio = f"{sent / minimum:.2f}" if sent and minimum else "–"
        shown = f"{share:.1%}" if mode.startswith("ep2") else "–"
        md.append(f"| {mode} | {s:.3f} | {tps:,.0f} | {step['ep1'] / s:.2f}x | {shown} | {sent or 0:,} | "
                  f"{minimum or 0:,.0f} | {ratio} |")
    saved = r["saved_activation_bytes"]
    act_rows = []
    for mode, layout, wk in (("ep1", plan.Layout(1, 1, 1), work),
                             ("plain_half", plan.Layout(1, 1, 1), half_work),
                             ("ep2_capacity", ep2, work), ("ep2_dropless", ep2, dropless_work)):
        devices = 1 if mode == "ep1" else 2
        planned = plan.plan_layout(model_cfg, layout, dataclasses.replace(hw_peak, devices=devices), wk)
        act_rows.append((mode, saved[mode], planned.activation_bytes))
    md += [
        "",
        "Activations of one forward on rank 0 (bytes autograd keeps for the backward, weights excluded) against "
        "the plan's formula:",
        "",
        "| mode | measured | plan | plan / measured - 1 |",
        "|---|---|---|---|",
        *[f"| {m} | {a:,} | {b:,.0f} | {b / a - 1:+.1%} |" for m, a, b in act_rows],
    ]
    md += [
        "",
        "Minimum bytes: capacity mode, 4 x E x G x C x d_model x 4 bytes per Switch layer (the fixed buffer, "
        "dispatch and combine, forward and backward; C from the library's capacity rule); dropless, 4 x routed "
        "tokens x d_model x 4 bytes (every token routed once, none dropped). The dispatcher counts every row of "
        "its buffer, the half that stays on the rank included.",
        "",
        "## Calibrating `switchformer plan` for this machine",
        "",
        f"- matmul FLOP/s per process, both processes multiplying ({tokens_per_rank_str()} x 256 @ 256 x 1024, "
        f"fp32): **{flops / 1e9:.1f} GFLOP/s** (median of 7)",
        f"- gloo all-to-all latency (8 floats, back to back): **{latency * 1e6:.0f} us**; bandwidth from a "
        f"{r['a2a_large_bytes'] / 1e6:.1f} MB buffer (half leaves the rank), latency subtracted: "
        f"**{bandwidth / 1e9:.2f} GB/s**",
        f"- cost of one collective after ~0.1 s of compute (matmuls then an 8-float all-to-all, against the matmuls "
        f"alone; the peer may lag): **{sync_cost * 1e3:.1f} ms**",
        f"- compute rate the plain model achieves, both processes each training it on half the batch without "
        f"communication (3 x forward FLOPs / measured plain_half step): "
        f"**{achieved / 1e9:.1f} GFLOP/s** ({achieved / flops:.0%} of the matmul rate)",
        "",
        "| estimate of the ep=2 step | compute (s) | all-to-all (s) | gradient reduction (s) | latency (s) | "
        "step (s) | measured (s) | estimate / measured - 1 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for label, est, meas in (("capacity; matmul FLOP/s, wire latency", est_peak, step["ep2_capacity"]),
                             ("capacity; plain_half FLOP/s, collective cost", est_model, step["ep2_capacity"]),
                             ("dropless; plain_half FLOP/s, collective cost", est_dropless, step["ep2_dropless"])):
        md.append(f"| {label} | {est.compute_s:.3f} | {est.alltoall_s:.4f} | {est.grad_reduce_s:.4f} | "
                  f"{est.latency_s:.4f} | {est.step_s:.3f} | {meas:.3f} | {rel(est.step_s, meas):+.0%} |")
    md += [
        "",
        f"The plan's all-to-all bytes for the ep=2 capacity step: {est_model.alltoall_bytes:,.0f} "
        f"(dispatcher: {r['bytes_per_step'].get('ep2_capacity', 0):,}).",
        "",
        "Commands (the recipe is the .toml beside this file):",
        "",
        f"    {cmd_peak}",
        f"    {cmd_model}",
        "",
        "The matmul calibration leaves out everything the FLOP count does not see (norms, softmax, routing and "
        "index work, the optimizer update, Python overhead) and prices a collective at its back-to-back wire "
        "latency. The second calibration folds the unseen work into the compute rate (measured on plain_half, "
        "without expert parallelism) and prices each collective at what it costs after a stretch of compute "
        "(measured on matmuls, not on the model): neither number comes from the ep=2 runs the estimate is compared "
        "with, and what the estimate adds to plain_half (capacity padding, all-to-all bytes, gradient traffic, "
        "collectives) is the plan's model of going parallel. The machine is shared: other agents' jobs run "
        "beside this benchmark, so absolute times move between runs.",
    ]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    record = {
        "date": date, "wall_s": wall, "reps": args.reps, "steps": args.steps, "load_average": load,
        "torch": torch.__version__, "config": toml_path.name, "raw": r,
        "median_step_s": step, "calibration": {"matmul_flops": flops, "a2a_latency_s": latency,
                                               "a2a_bandwidth": bandwidth, "ep1_achieved_flops": achieved},
        "plan_ep2_capacity_matmul": est_peak.to_dict(), "plan_ep2_capacity_ep1rate": est_model.to_dict(),
        "plan_ep2_dropless_ep1rate": est_dropless.to_dict(),
    }
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("\n".join(md))


def tokens_per_rank_str() -> str:
    return str(GLOBAL_SEQUENCES // 2 * INPUT_LENGTH)


if __name__ == "__main__":
    main()

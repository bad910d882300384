"""Benchmark SwitchFFN against a FLOP-matched dense FFN and transformers' layer (optionally the one-hot einsum
oracle and a routing/experts profile split).

    python benchmarks/bench_moe_layer.py --threads 2   # 16 x 512 tokens, d_model 512, d_ff 2048, E = 8, 32, 128
    python benchmarks/bench_moe_layer.py --all         # also capacity factor 1.0, the oracle and the profile split
    python benchmarks/bench_moe_layer.py --quick       # a small smoke run

The process is a user's plain process: nothing is set up before the layers are built, so the layer runs with its
defaults (a CPU ``SwitchFFN`` applies ``switchformer.runtime``'s allocator setting when it is built, which then
holds for every contestant alike; ``--malloc-tuning off`` measures the documented opt-out instead).

Every contestant processes the same tokens: the dense FFN has the d_ff of one expert (equal FLOPs per token);
transformers' SwitchTransformersSparseMLP runs with ``expert_capacity`` = sequence length so it drops nothing,
against our dropless layer. Timings are medians of interleaved repetitions (the machine may be shared: compare
ratios from one run, not absolute times). Activation memory is the bytes autograd saves for backward (parameters
excluded), measured with ``torch.autograd.graph.saved_tensors_hooks``. With ``--all`` the profile splits our
forward+backward into expert matmuls and everything else (routing, sorting, gathering, scattering), by timing the
experts alone on pre-dispatched tokens.

Writes ``benchmarks/results/moe_layer_<device>_<date>.{md,json}``: measurements only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from switchformer import runtime
from switchformer.moe import SwitchFFN, einsum_switch_reference, expert_capacity, plan_routing


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.wi = nn.Linear(d_model, d_ff, bias=False)
        self.wo = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.wo(F.relu(self.wi(x)))


class OracleFFN(nn.Module):
    """The paper's one-hot einsum dispatch (Fig. 15/16) with one routing group per sequence."""

    def __init__(self, layer: SwitchFFN, seq: int) -> None:
        super().__init__()
        self.layer, self.seq = layer, seq

    def forward(self, x):
        layer = self.layer
        B, S, M = x.shape
        routed = layer.router(x.reshape(-1, M))
        cap = expert_capacity(S, layer.num_experts, layer.capacity_factor, min_capacity=layer.min_capacity)
        y, _ = einsum_switch_reference(
            x, routed.expert_index_TK.view(B, S, 1), routed.gates_TK.view(B, S, 1), routed.use_TK.view(B, S, 1), cap,
            layer.experts.w_in, layer.experts.w_out,
        )
        return y


def hf_layer(d_model: int, d_ff: int, num_experts: int, seq: int, like: SwitchFFN | None = None):
    """transformers' SwitchTransformersSparseMLP with ``expert_capacity=seq`` (drops nothing), holding the same
    router and expert weights as ``like`` so both route the same tokens to the same experts."""
    try:
        from transformers import SwitchTransformersConfig
        from transformers.models.switch_transformers.modeling_switch_transformers import (
            SwitchTransformersSparseMLP,
        )
    except ImportError:
        return None
    cfg = SwitchTransformersConfig(
        d_model=d_model, d_ff=d_ff, num_experts=num_experts, expert_capacity=seq, router_jitter_noise=0.01,
        dropout_rate=0.0,
    )
    layer = SwitchTransformersSparseMLP(cfg)
    if like is not None:
        with torch.no_grad():
            layer.router.classifier.weight.copy_(like.router.weight)
            for j in range(num_experts):
                layer.experts[f"expert_{j}"].wi.weight.copy_(like.experts.w_in[j])
                layer.experts[f"expert_{j}"].wo.weight.copy_(like.experts.w_out[j])
    return layer


class ExpertsOnly(nn.Module):
    """The layer's expert matmuls alone, on tokens the layer already dispatched (to split the profile)."""

    def __init__(self, layer: SwitchFFN, x_dispatched: torch.Tensor, counts: list[int]) -> None:
        super().__init__()
        self.experts, self.x_dispatched, self.counts = layer.experts, x_dispatched, counts

    def forward(self, _x):
        return self.experts(self.x_dispatched, self.counts)


def run(module, x, backward: bool):
    if backward:
        module.zero_grad(set_to_none=True)
        x.grad = None
        # A non-leaf copy (for every contestant alike): transformers' router multiplies its input in place.
        out = module(x.clone())
        y = out[0] if isinstance(out, tuple) else out
        y.backward(torch.ones_like(y))
    else:
        with torch.no_grad():
            module(x.clone())


def activation_bytes(module, x) -> int:
    params = {p.data_ptr() for p in module.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.data_ptr() not in seen:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    x = x.clone()  # non-leaf, as in run()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(x)
    del out
    return sum(seen.values())


def dispatched_for_experts(layer: SwitchFFN, x):
    """The layer's own dispatch of x, as a leaf input for timing the experts alone."""
    with torch.no_grad():
        x_TM = x.reshape(-1, layer.d_model)
        routed = layer.router(x_TM)
        T = x_TM.shape[0]
        cap = expert_capacity(T, layer.num_experts, layer.capacity_factor, min_capacity=layer.min_capacity)
        plan = plan_routing(routed.expert_index_TK, routed.gates_TK, routed.use_TK, num_experts=layer.num_experts,
                            group_T=torch.zeros(T, dtype=torch.long), num_groups=1, capacity=cap)
        d = layer.dispatcher.dispatch(x_TM, plan)
    xin = d.x.detach().requires_grad_(True)
    return xin, d.counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke run)")
    ap.add_argument("--all", action="store_true",
                    help="also time capacity factor 1.0, the one-hot einsum oracle and the experts alone")
    ap.add_argument("--reps", type=int, default=11, help="interleaved repetitions per contestant")
    ap.add_argument("--experts", type=int, nargs="+", default=None)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--malloc-tuning", choices=("auto", "off"), default="auto",
                    help="auto: the layer's default (switchformer.runtime applies its allocator setting when a CPU "
                         "layer is built); off: the documented opt-out, glibc's defaults")
    ap.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.malloc_tuning == "off":
        os.environ[runtime.ENV_VAR] = "0"

    torch.manual_seed(0)
    if args.quick:
        batch, seq, d_model, d_ff, experts, reps = 4, 128, 128, 512, args.experts or [1, 8], min(args.reps, 3)
    else:
        batch, seq, d_model, d_ff, experts, reps = 16, 512, 512, 2048, args.experts or [8, 32, 128], args.reps
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # The input requires grad, as a layer inside a model does: every contestant computes its input gradient.
    x = torch.randn(batch, seq, d_model, device=device, dtype=dtype, requires_grad=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rows = []
    dense = DenseFFN(d_model, d_ff).to(device, dtype)
    for E in experts:
        ours_dropless = SwitchFFN(d_model, d_ff, E, capacity_factor=None).to(device, dtype)
        contestants = {"dense": dense, "ours_dropless": ours_dropless}
        hf = hf_layer(d_model, d_ff, E, seq, like=ours_dropless)
        if hf is not None:
            hf = hf.to(device, dtype)
            contestants["transformers"] = hf
        if args.all:
            ours_cf1 = SwitchFFN(d_model, d_ff, E, capacity_factor=1.0).to(device, dtype)
            ours_cf1.load_state_dict(ours_dropless.state_dict())
            contestants["ours_cf1.0"] = ours_cf1
            contestants["oracle_einsum"] = OracleFFN(ours_cf1, seq)
            xin, counts = dispatched_for_experts(ours_cf1, x)
            contestants["experts_only"] = ExpertsOnly(ours_cf1, xin, counts)
        times = {(name, bwd): [] for name in contestants for bwd in (False, True)}
        for mod in contestants.values():  # warm-up
            mod.train()
            run(mod, x, False)
            run(mod, x, True)
        for _ in range(reps):
            for bwd in (False, True):
                for name, mod in contestants.items():
                    sync()
                    t0 = time.perf_counter()
                    run(mod, x, bwd)
                    sync()
                    times[(name, bwd)].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        mem = {name: activation_bytes(mod, x) for name, mod in contestants.items() if name != "experts_only"}
        row = {"num_experts": E}
        for (name, bwd), t in med.items():
            row[f"{name}_{'fwdbwd' if bwd else 'fwd'}_ms"] = 1e3 * t
        row["samples_ms"] = {f"{name}_{'fwdbwd' if bwd else 'fwd'}": [round(1e3 * t, 1) for t in ts]
                             for (name, bwd), ts in times.items()}  # every repetition, for judging the noise
        for name, b in mem.items():
            row[f"{name}_activation_MB"] = b / 2**20
        for bwd in (False, True):
            tag = "fwdbwd" if bwd else "fwd"
            row[f"ours_dropless_over_dense_{tag}"] = med[("ours_dropless", bwd)] / med[("dense", bwd)]
            if hf is not None:
                row[f"transformers_over_ours_{tag}"] = med[("transformers", bwd)] / med[("ours_dropless", bwd)]
                row[f"transformers_over_dense_{tag}"] = med[("transformers", bwd)] / med[("dense", bwd)]
            if args.all:
                row[f"ours_cf1_over_dense_{tag}"] = med[("ours_cf1.0", bwd)] / med[("dense", bwd)]
                row[f"oracle_over_ours_{tag}"] = med[("oracle_einsum", bwd)] / med[("ours_cf1.0", bwd)]
                row[f"routing_share_{tag}"] = 1 - med[("experts_only", bwd)] / med[("ours_cf1.0", bwd)]
        rows.append(row)
        shown = {k: round(v, 3) if isinstance(v, float) else v for k, v in row.items() if k != "samples_ms"}
        print(json.dumps(shown), flush=True)

    meta = {
        "date": datetime.date.today().isoformat(), "device": str(device), "dtype": str(dtype),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "platform": platform.platform(),
        "processor": platform.processor(), "shape": {"batch": batch, "seq": seq, "d_model": d_model, "d_ff": d_ff},
        "reps": reps, "quick": args.quick, "malloc_tuning": args.malloc_tuning,
        "malloc_tuning_applied": runtime.malloc_tuning_applied(), "loadavg_end": os.getloadavg()[0],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"moe_layer_{device.type}_{meta['date']}" + ("_quick" if args.quick else "")
    stem += "_malloc_off" if args.malloc_tuning == "off" else ""
    (args.out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    nan = float("nan")
    md = [f"# SwitchFFN benchmark ({device.type}, {dtype}, {meta['date']})", "",
          f"{batch} x {seq} tokens, d_model {d_model}, d_ff {d_ff}; torch {torch.__version__}, "
          f"{meta['threads']} threads; medians of {reps} interleaved repetitions; a plain process (allocator "
          f"setting: {args.malloc_tuning}, applied: {meta['malloc_tuning_applied']}); load average at the end "
          f"{meta['loadavg_end']:.2f}. Ours is dropless; transformers drops nothing (expert_capacity = sequence "
          "length). Times in ms.", "",
          "| E | ours fwd+bwd | transformers fwd+bwd | dense fwd+bwd | transformers / ours (fwd+bwd) "
          "| transformers / ours (fwd) | ours / dense (fwd+bwd) | activation MB: dense / ours / transformers |",
          "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mems = " / ".join(f"{r.get(f'{n}_activation_MB', nan):.0f}"
                          for n in ("dense", "ours_dropless", "transformers"))
        md.append(f"| {r['num_experts']} | {r['ours_dropless_fwdbwd_ms']:.0f} "
                  f"| {r.get('transformers_fwdbwd_ms', nan):.0f} "
                  f"| {r['dense_fwdbwd_ms']:.0f} | {r.get('transformers_over_ours_fwdbwd', nan):.2f} "
                  f"| {r.get('transformers_over_ours_fwd', nan):.2f} | {r['ours_dropless_over_dense_fwdbwd']:.2f} "
                  f"| {mems} |")
    if args.all:
        md += ["", "| E | ours cf1.0 / dense (fwd+bwd) | oracle / ours cf1.0 (fwd+bwd) | routing share of ours cf1.0 "
               "(fwd+bwd) |", "|---|---|---|---|"]
        md += [f"| {r['num_experts']} | {r['ours_cf1_over_dense_fwdbwd']:.3f} | {r['oracle_over_ours_fwdbwd']:.2f} "
               f"| {100 * r['routing_share_fwdbwd']:.1f}% |" for r in rows]
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()

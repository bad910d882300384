"""switchformer models vs transformers' SwitchTransformers on CPU: greedy generation and forward throughput.

    .venv/bin/python benchmarks/bench_models.py             # full run, writes benchmarks/results/models_cpu_<date>.*
    .venv/bin/python benchmarks/bench_models.py --quick     # smoke test (tiny-8, small batch, prints only)
    .venv/bin/python benchmarks/bench_models.py --configs tiny-64 --profile   # + torch.profiler tables of ours
    .venv/bin/python benchmarks/bench_models.py --render benchmarks/results/X.json   # re-render a report

Both models hold identical weights: a randomly initialised transformers model is converted with
``switchformer.interop.from_transformers`` (the checkpoint adapter), and the transformers experts are then re-pointed
at views of our stacked expert tensors so the pair costs one copy of the expert weights. The forward pass uses
transformers' per-sequence ``expert_capacity`` on both sides (the max logit difference is reported). Our
``generate()`` runs with its default, dropless routing (``--hf-capacity-in-generate`` switches to ``dropless=False``);
transformers keeps its capacity in the encoder, so the report counts how many encoder tokens that capacity drops
(0 means both compute the same thing) and checks that the greedy tokens are identical.

Method: warm-up, then ``--reps`` interleaved repetitions (the order alternates each repetition, so neither side
always runs on a cache the other just warmed); medians; ratio = transformers time / our time (> 1: we are faster).
Configurations: the ``tiny`` (d_model 128, 4+4 layers) and ``small`` (d_model 512, 6+6 layers) presets, vocabulary
32128, 8 and 64 experts, sparse step 2, capacity 64 per sequence (the released checkpoints' value); batch 8 x 128
encoder tokens; forward with 32 and 128 decoder tokens; generation of 32 new tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from switchformer import interop as H
from switchformer.models.presets import get_preset

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Setting:
    batch: int = 8
    input_len: int = 128
    decoder_lens: tuple[int, ...] = (32, 128)
    new_tokens: int = 32
    reps: int = 5
    vocab: int = 32128
    capacity: int = 64
    dropless: bool = True  # our generate() default; False keeps transformers' encoder capacity (identical tokens)


def make_pair(name: str, s: Setting, seed: int = 0):
    """(transformers model, our model) with identical weights, both in eval mode."""
    import transformers

    preset, experts = name.split("-")
    cfg = get_preset(preset)
    cfg = dataclasses.replace(cfg, vocab_size=s.vocab, moe=dataclasses.replace(
        cfg.moe, num_experts=int(experts), expert_capacity=s.capacity))
    hf_dict = {k: v for k, v in H.config_to_hf(cfg).items() if k != H.MARKER}
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.SwitchTransformersForConditionalGeneration(transformers.SwitchTransformersConfig(**hf_dict))
    hf.eval()
    ours = H.from_transformers(hf).eval()
    _share_experts(hf, ours)
    return hf, ours


def _share_experts(hf, ours) -> None:
    """Point transformers' expert weights at views of our stacked tensors (same values; halves the memory)."""
    sd = ours.state_dict()
    hf_views = H.state_dict_to_hf(sd, ours.config)
    modules = dict(hf.named_modules())
    for key, view in hf_views.items():
        if ".experts.expert_" in key:
            mod_name, attr = key.rsplit(".", 1)
            setattr(modules[mod_name], attr, torch.nn.Parameter(view, requires_grad=False))


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_pair(name: str, s: Setting, profile: bool = False) -> dict:
    t_build = time.perf_counter()
    hf, ours = make_pair(name, s)
    build_s = time.perf_counter() - t_build
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, s.vocab, (s.batch, s.input_len), generator=g)
    mask = torch.ones_like(ids)
    c = ours.config
    out: dict = {"config": name, "build_s": round(build_s, 2), "params": sum(p.numel() for p in ours.parameters()),
                 "d_model": c.d_model, "layers": f"{c.num_layers}+{c.num_decoder_layers}",
                 "experts": c.moe.num_experts}

    # ---- forward throughput
    for T in s.decoder_lens:
        dec = torch.randint(2, s.vocab, (s.batch, T), generator=g)
        with torch.inference_mode():
            a = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec).logits
            b = ours(ids, attention_mask=mask, decoder_input_ids=dec).logits
            err = float((a - b).abs().max())
            del a, b
            runs = {"ours": lambda dec=dec: ours(ids, attention_mask=mask, decoder_input_ids=dec),
                    "hf": lambda dec=dec: hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)}
            times = _interleaved(runs, s.reps)
        tokens = s.batch * (s.input_len + T)
        out[f"forward_dec{T}"] = _summary(times, tokens, "tokens/s") | {"max_abs_logit_diff": err}

    # ---- greedy generation
    # Our generate() routes dropless by default; transformers keeps its per-sequence capacity in the encoder (a
    # decode step routes one token per sequence, which never overflows). The two compute the same thing when the
    # encoder drops nothing under that capacity, which we count; the token check below confirms it.
    with torch.inference_mode():
        _, enc_routers = ours.encode(ids, mask.bool())
    encoder_drops = int(sum(int(r.dropped_tokens) for r in enc_routers))
    eos = ours.config.eos_token_id
    res = {}

    def gen_ours():
        res["ours"] = ours.generate(ids, attention_mask=mask, max_new_tokens=s.new_tokens, eos_token_id=eos,
                                    dropless=s.dropless)

    def gen_hf():
        res["hf"] = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.new_tokens, do_sample=False)

    with torch.inference_mode():
        times = _interleaved({"ours": gen_ours, "hf": gen_hf}, s.reps)
    same = res["ours"].shape == res["hf"].shape and bool(torch.equal(res["ours"], res["hf"]))
    steps = res["ours"].shape[1] - 1
    out["generate"] = _summary(times, s.batch * steps, "new tokens/s") | {
        "tokens_equal": same, "steps": steps, "ours_dropless": s.dropless, "encoder_drops_at_capacity": encoder_drops}
    if profile:
        out["profile"] = _profile(ours, hf, ids, mask, s)
    return out


def _interleaved(runs: dict, reps: int) -> dict[str, list[float]]:
    names = list(runs)
    for n in names:  # warm-up (allocator, lazy init, oneDNN kernels)
        runs[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in names if r % 2 == 0 else names[::-1]:
            times[n].append(_time(runs[n]))
    return times


def _summary(times: dict[str, list[float]], work: int, unit: str) -> dict:
    med = {n: statistics.median(v) for n, v in times.items()}
    return {
        "ours_ms": round(med["ours"] * 1e3, 2), "hf_ms": round(med["hf"] * 1e3, 2),
        "ours_rate": round(work / med["ours"], 1), "hf_rate": round(work / med["hf"], 1), "unit": unit,
        "ratio": round(med["hf"] / med["ours"], 3),
        "ratio_of_minima": round(min(times["hf"]) / min(times["ours"]), 3),
        "ours_all_ms": [round(t * 1e3, 2) for t in times["ours"]],
        "hf_all_ms": [round(t * 1e3, 2) for t in times["hf"]],
    }


def _profile(ours, hf, ids, mask, s: Setting) -> dict:
    """Top CPU ops of our forward (128 decoder tokens) and generation, and of transformers' for comparison."""
    from torch.profiler import ProfilerActivity, profile

    dec = ids[:, : max(s.decoder_lens)]
    tables = {}
    with torch.inference_mode():
        for label, fn in (
            ("ours_forward", lambda: ours(ids, attention_mask=mask, decoder_input_ids=dec)),
            ("hf_forward", lambda: hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec)),
            ("ours_generate", lambda: ours.generate(ids, attention_mask=mask, max_new_tokens=s.new_tokens,
                                                    eos_token_id=None, dropless=s.dropless)),
            ("hf_generate", lambda: hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=s.new_tokens,
                                                do_sample=False)),
        ):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            tables[label] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
            print(f"\n==== {label}\n{tables[label]}", flush=True)
    return tables


def write_report(results: list[dict], s: Setting, env: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    payload = {"env": env, "setting": dataclasses.asdict(s), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    stem.with_suffix(".md").write_text(render_report(results, s, env))
    print(f"wrote {stem}.md and .json")


def render_report(results: list[dict], s: Setting, env: dict) -> str:
    """The Markdown report of one run: measurements and the agreement checks, no verdicts."""
    lines = [
        f"# switchformer vs transformers SwitchTransformers, CPU ({env['date']})",
        "",
        f"torch {env['torch']}, transformers {env['transformers']}, {env['threads']} threads, {env['cpu']}. "
        f"Batch {s.batch} x {s.input_len} encoder tokens, vocabulary {s.vocab}, capacity {s.capacity} per sequence, "
        f"{s.reps} interleaved repetitions, medians. Ratio = transformers time / switchformer time (> 1: faster). "
        f"Our generate() {'dropless (default)' if s.dropless else 'with dropless=False'}. 1-minute load average "
        f"{env['loadavg_start']:.1f} at the start and {env.get('loadavg_end', float('nan')):.1f} at the end "
        f"(shared machine; the JSON has every repetition and the ratio of minima). Freed memory reused "
        f"(`runtime.reuse_freed_memory`, process-wide, both sides): {env.get('reuse_freed_memory', False)}.",
        "",
        "| config | params | measure | switchformer | transformers | ratio | agreement |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for key in [k for k in r if k.startswith("forward_dec")] + ["generate"]:
            m = r[key]
            check = (f"tokens equal: {m['tokens_equal']}; encoder drops at capacity: "
                     f"{m['encoder_drops_at_capacity']}" if key == "generate"
                     else f"max logit diff {m['max_abs_logit_diff']:.1e}")
            label = (f"greedy generate {m['steps']} tokens" if key == "generate"
                     else f"forward enc {s.input_len} + dec {key.removeprefix('forward_dec')}")
            lines.append(
                f"| {r['config']} | {r['params'] / 1e6:.0f}M | {label} | {m['ours_rate']:.0f} {m['unit']} "
                f"({m['ours_ms']:.0f} ms) | {m['hf_rate']:.0f} ({m['hf_ms']:.0f} ms) | {m['ratio']:.2f}x | {check} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test: tiny-8, batch 2 x 32, 2 reps, no files")
    p.add_argument("--configs", default="tiny-8,tiny-64,small-8,small-64")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--hf-capacity-in-generate", action="store_true",
                   help="generate with dropless=False (transformers' encoder capacity) instead of our default")
    p.add_argument("--profile", action="store_true", help="print torch.profiler tables (and store them in JSON)")
    p.add_argument("--out", default=None, help="output stem (default benchmarks/results/models_cpu_<date>)")
    p.add_argument("--fresh-memory", action="store_true",
                   help="keep glibc's default of returning big freed blocks to the OS (default: reuse them, as the "
                        "first CPU SwitchFFN does; process-wide, so transformers gets the same setting)")
    p.add_argument("--render", metavar="JSON", default=None,
                   help="rewrite the Markdown report beside an earlier run's JSON from that JSON (measures nothing)")
    args = p.parse_args(argv)
    if args.render:
        path = Path(args.render)
        payload = json.loads(path.read_text())
        path.with_suffix(".md").write_text(render_report(payload["results"], Setting(**{
            k: tuple(v) if k == "decoder_lens" else v for k, v in payload["setting"].items()}), payload["env"]))
        print(f"wrote {path.with_suffix('.md')}")
        return 0
    from switchformer import runtime

    if args.fresh_memory:
        runtime.disable_malloc_tuning()  # our models' Switch layers would otherwise apply it when built
    else:
        # Applied before either model is built, so both sides get it from the start: the [8, 128, 32128] logits
        # (131 MB) would otherwise be fresh, zero-filled pages on every call on both sides.
        runtime.reuse_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setting(reps=args.reps, dropless=not args.hf_capacity_in_generate)
    configs = args.configs.split(",")
    if args.quick:
        s = Setting(batch=2, input_len=32, decoder_lens=(8,), new_tokens=8, reps=2, dropless=s.dropless)
        configs = ["tiny-8"] if args.configs == p.get_default("configs") else configs
    import transformers

    env = {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "torch": torch.__version__,
        "transformers": transformers.__version__, "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg()[0], "reuse_freed_memory": not args.fresh_memory,
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        env["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), env["cpu"])
    print(json.dumps(env), flush=True)
    results = []
    for name in configs:
        r = bench_pair(name, s, profile=args.profile)
        results.append(r)
        brief = {k: (v["ratio"] if isinstance(v, dict) and "ratio" in v else v) for k, v in r.items()
                 if k != "profile"}
        print(json.dumps(brief), flush=True)
        for key in [k for k in r if k.startswith("forward_dec")] + ["generate"]:
            m = r[key]
            print(f"  {name:9s} {key:13s} ours {m['ours_ms']:9.1f} ms  hf {m['hf_ms']:9.1f} ms  "
                  f"ratio {m['ratio']:.2f}x", flush=True)
    if not all(r["generate"]["tokens_equal"] for r in results):
        print("WARNING: greedy tokens differ between switchformer and transformers", flush=True)
    env["loadavg_end"] = os.getloadavg()[0]
    if args.out or not args.quick:
        stem = Path(args.out) if args.out else RESULTS / f"models_cpu_{dt.date.today().isoformat()}"
        write_report(results, s, env, stem)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

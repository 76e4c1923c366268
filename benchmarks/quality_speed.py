"""One quality-speed table (issue 7): every SegQuant configuration and every peer preset with its PSNR on
mnist-flux (benchmarks/quality.py) and its time for one FLUX.1-dev-size denoiser call (benchmarks/speed.py).

    python benchmarks/quality_speed.py                          # results/quality.json + speed.jsonl -> quality_speed.*
    python benchmarks/quality_speed.py --speed-run h200-2026-12-01 --quality DIR/quality.json --speed DIR/speed.jsonl

Per GEMM format (int8, fp8): each quality row is timed as the speed.py variant ``TIMING`` names (explicit data
below). ModelOpt's presets deploy through TensorRT, which is not available here: they are timed as the equivalent
real-kernel configuration of speed.py (same formats, static per-tensor activations, no segments or DualScale;
"as shipped" with every *proj_out* in bf16, as the presets keep it) and labelled "timed as equivalent kernels".
Times come from one speed.py run (``--speed-run``; default the run that measured most of the mapped variants),
speed-ups against that run's bf16; or from several runs, each with its own bf16 (``--speed-run a,b``: a variant
from the first run that timed it, scaled by the first run's bf16 over its own).

The front: for every peer preset, is there a SegQuant configuration of its format that is at least as fast
(its median within the run's noise of the peer's: ``tolerance_ms``) and whose PSNR is not significantly lower
(the paired 95% interval of SegQuant - peer from quality.py has an upper bound >= 0)? A row or an interval that
the result files do not hold is shown as missing, never filled in. Results: quality_speed.{json,md,png}.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from _common import RESULTS, environment, figure, parser, read_jsonl, write_results
from quality import PEERS  # the peer presets of each format, whose paired intervals quality.py computes

QUALITY_MODEL = "mnist-flux"
TOLERANCE = 0.02
"""Relative speed tolerance when a run's records carry no per-call times (``ms_all``) to measure its noise."""
EQUIVALENT = "timed as equivalent kernels"

PEER_TIMING: dict[str, tuple[str, str]] = {  # peer row -> (speed.py variant, how it is timed)
    "torchao int8 dynamic": ("torchao_int8_dynamic", ""),
    "torchao fp8 dynamic per-row": ("torchao_fp8_rowwise", ""),
    "ModelOpt INT8_SMOOTHQUANT_CFG (as shipped)": ("segquant_int8_static_plain_asshipped",
                                                   f"{EQUIVALENT} (SmoothQuant folded)"),
    "ModelOpt INT8_SMOOTHQUANT_CFG (every Linear)": ("segquant_int8_static_plain",
                                                     f"{EQUIVALENT} (SmoothQuant folded)"),
    "ModelOpt INT8_DEFAULT_CFG (as shipped)": ("segquant_int8_static_plain_asshipped", EQUIVALENT),
    "ModelOpt INT8_DEFAULT_CFG (every Linear)": ("segquant_int8_static_plain", EQUIVALENT),
    "ModelOpt FP8_DEFAULT_CFG (as shipped)": ("segquant_fp8_static_plain_asshipped", EQUIVALENT),
    "ModelOpt FP8_DEFAULT_CFG (every Linear)": ("segquant_fp8_static_plain", EQUIVALENT),
}
STATIC_PRECISIONS = {"int8": ("int8_w8a8", "int8_perchannel"), "fp8": ("fp8",)}
"""quality.py's static precisions of each format (all through ModelOpt fake quant)."""
STATIC_TIMING: dict[str, tuple[str, str]] = {  # variant -> (suffix of segquant_<fmt>_static, how it is timed)
    "baseline": ("_plain", ""),
    "+SegLinear": ("_nodual", ""),
    "+DualScale": ("", "timed with segments (folded into the weight: the same one GEMM)"),
    "SegQuant": ("", ""),
    "shift": ("_shift", ""),
    "shift per-channel": ("_shift", "timed with the per-tensor shift (the same kernels: a subtraction, a bias)"),
    "DualScale+shift": ("", "timed without the shift (a fused subtraction and a bias)"),
    "alpha search": ("", "per-layer SmoothQuant factors folded: the same kernels"),
    "auto": ("", "upper bound: DualScale on every candidate layer (auto keeps it on some)"),
    "per-segment smoothing": ("", "SmoothQuant factors folded: the same kernels"),
    "recipe": ("", "the recipe's high-precision layers (embedders, final proj_out: 0.0% of the FLOPs) timed quantized"),
    "recipe DualScale": ("", "the recipe's high-precision layers (0.0% of the FLOPs) timed quantized"),
}
RECIPE_TIMING = {"fp8": "_nodual", "int8": "_shift"}
"""How each format's bundled recipe (``recipe`` row) runs: fp8 without DualScale, int8 with the shift in its place."""
DYNAMIC_TIMING: dict[str, tuple[str, str]] = {  # "<fmt> dynamic <variant>" -> (suffix of segquant_<fmt>_dynamic, how)
    "SegQuant": ("", ""),
    "+SegLinear": ("_nodual", ""),
    "shift": ("_nodual", "timed without the shift (a fused subtraction and a bias)"),
    "DualScale+shift": ("", "timed without the shift (a fused subtraction and a bias)"),
}


def timing_map() -> dict[str, dict]:
    """quality row -> {format, kind (peer / segquant), variant (speed.py), note}: the explicit join."""
    out = {}
    for fmt, peers in PEERS.items():
        for peer in peers:
            variant, note = PEER_TIMING[peer]
            out[peer] = {"format": fmt, "kind": "peer", "variant": variant, "note": note}
        for precision in STATIC_PRECISIONS[fmt]:
            for name, (suffix, note) in STATIC_TIMING.items():
                suffix = RECIPE_TIMING.get(fmt, suffix) if name == "recipe" else suffix
                out[f"{precision} {name}"] = {"format": fmt, "kind": "segquant", "variant":
                                              f"segquant_{fmt}_static{suffix}", "note": note}
        for name, (suffix, note) in DYNAMIC_TIMING.items():
            out[f"{fmt} dynamic {name}"] = {"format": fmt, "kind": "segquant",
                                            "variant": f"segquant_{fmt}_dynamic{suffix}", "note": note}
    return out


# ---- speed ----------------------------------------------------------------------------------------------
def run_label(record: dict) -> str:
    """The speed.py run a record belongs to (as speed.py's report groups them)."""
    return record.get("run") or f"git {record.get('git', '?')}"


def pick_run(records: list[dict], wanted: set[str], run: str | None = None) -> tuple[str | None, dict[str, dict]]:
    """The records of one speed.py run by variant (a later record of a variant replaces an earlier one): ``run``,
    else the run with bf16 that measured most of ``wanted`` (the later run on a tie). ``(None, {})`` if none.

    ``run`` may name several runs, comma-separated: a variant's record comes from the first of them that timed it,
    its times scaled by the ratio of the first run's bf16 median to its own run's (each run carries its own bf16),
    so that variants of different runs compare through their speed-up over bf16."""
    runs: dict[str, dict[str, dict]] = {}
    for r in records:
        if r.get("bench", "flux_e2e") == "flux_e2e" and "variant" in r:
            runs.setdefault(run_label(r), {})[r["variant"]] = r
    if run is not None:
        names = run.split(",")
        missing = [n for n in names if n not in runs]
        if missing:
            raise SystemExit(f"speed run(s) {missing} not found; runs: {', '.join(runs)}")
        if len(names) == 1:
            return run, runs[run]
        return run, merge_runs([runs[n] for n in names], names)
    usable = [(sum(1 for v in wanted if "ms_median" in recs.get(v, {})), i, label)
              for i, (label, recs) in enumerate(runs.items()) if "ms_median" in recs.get("bf16", {})]
    if not usable:
        return None, {}
    label = max(usable)[2]
    return label, runs[label]


def merge_runs(runs: list[dict[str, dict]], names: list[str]) -> dict[str, dict]:
    """Variant -> record from the first run that timed it, scaled to the first run's bf16 (see ``pick_run``)."""
    bf16 = [recs.get("bf16", {}).get("ms_median") for recs in runs]
    if any(b is None for b in bf16):
        lacking = [n for n, b in zip(names, bf16) if not b]
        raise SystemExit(f"every merged speed run needs its own bf16 record: {lacking}")
    out: dict[str, dict] = {}
    for recs, name, base in zip(runs, names, bf16):
        factor = bf16[0] / base
        for variant, rec in recs.items():
            if "ms_median" in out.get(variant, {}) or (variant in out and "ms_median" not in rec):
                continue
            if "ms_median" in rec and name != names[0]:
                rec = dict(rec, ms_median=rec["ms_median"] * factor, ms_all=[t * factor for t in rec.get("ms_all", [])],
                           scaled_from={"run": name, "ms_median": rec["ms_median"], "factor": round(factor, 4)})
            out[variant] = rec
    return out


def noise_ms(record: dict) -> float | None:
    """The spread of one call's time: 1.4826 x the median absolute deviation of the timed calls (``ms_all``,
    three or more), or None when the record has no per-call times."""
    times = record.get("ms_all") or []
    if len(times) < 3:
        return None
    med = statistics.median(times)
    return 1.4826 * statistics.median(abs(t - med) for t in times)


def tolerance_ms(candidate: dict, peer: dict, tolerance: float = TOLERANCE) -> float:
    """How much slower than ``peer`` a candidate may measure and still count as at least as fast: the larger of
    ``tolerance`` x the peer's median and the two records' combined spread (``noise_ms``)."""
    spreads = [noise_ms(candidate), noise_ms(peer)]
    combined = math.sqrt(sum(s ** 2 for s in spreads)) if all(s is not None for s in spreads) else 0.0
    return max(tolerance * peer["ms_median"], combined)


# ---- quality --------------------------------------------------------------------------------------------
def quality_rows(model: dict) -> dict[str, dict]:
    """Per quality row of one model of quality.json: PSNR mean and std over its runs, the seeds, or its error."""
    out = {}
    for name, rr in model.get("rows", {}).items():
        runs = rr.get("runs", [])
        ok = [r["psnr_db"] for r in runs if "error" not in r and r.get("psnr_db") is not None]
        err = next((r["error"] for r in runs if "error" in r), None)
        out[name] = {"psnr_mean": statistics.fmean(ok) if ok else None,
                     "psnr_std": statistics.stdev(ok) if len(ok) > 1 else None, "runs": len(ok),
                     "error": None if ok and err is None else (err or "no run")}
    return out


def paired_psnr(model: dict) -> dict[tuple[str, str], dict]:
    """(row, compared with) -> the paired PSNR interval, from quality.json's ``peer_paired`` and ``paired``."""
    out = {}
    for key in ("paired", "peer_paired"):
        for e in model.get(key, []):
            if "psnr" in e:
                out[(e["row"], e["baseline"])] = e["psnr"]
    return out


# ---- the join and the front ------------------------------------------------------------------------------
def join(model: dict, speed: dict[str, dict], mapping: dict[str, dict] | None = None) -> list[dict]:
    """One entry per mapped quality row: its PSNR, its speed variant's time and speed-up over the run's bf16,
    and its paired PSNR interval against each peer of its format. Missing pieces stay None (with the reason)."""
    mapping = timing_map() if mapping is None else mapping
    quality = quality_rows(model)
    pairs = paired_psnr(model)
    bf16 = speed.get("bf16", {}).get("ms_median")
    rows = []
    for name, m in mapping.items():
        q = quality.get(name, {"psnr_mean": None, "psnr_std": None, "runs": 0,
                               "error": "missing (not in quality.json)"})
        rec = speed.get(m["variant"], {})
        ms = rec.get("ms_median")
        rows.append({"name": name, **m, **q,
                     "ms": ms, "ms_noise": noise_ms(rec) if ms else None, "timing": timing_note(rec),
                     "speed_error": None if ms else rec.get("error", "not in this speed run"),
                     "speedup": bf16 / ms if ms and bf16 else None,
                     "vs_peer": {peer: pairs.get((name, peer)) for peer in PEERS[m["format"]]}
                     if m["kind"] == "segquant" else {}})
    return rows


def timing_note(rec: dict) -> str:
    """How a record was timed, where it differs from the run's other records: from another run (scaled), or as
    ordinary calls in a run of CUDA-graph replays."""
    notes = []
    if rec.get("cuda_graph") and str(rec.get("timed_as", "")).startswith("calls"):
        notes.append("ordinary calls, not CUDA-graph replays" + (": its capture fails" if "capture" in
                                                                 rec.get("cuda_graph_error", "") or "skip" in
                                                                 rec["timed_as"] else ""))
    if "scaled_from" in rec:
        src = rec["scaled_from"]
        notes.append(f"run {src['run']}: {src['ms_median']:.1f} ms x {src['factor']} (bf16 ratio)")
    return "; ".join(notes)


def defaults_on_front(rows: list[dict], front: list[str], fmt: str) -> list[dict]:
    """Each bundled recipe row of ``fmt`` (``<precision> recipe``) with data: on the SegQuant front or not, and the
    rows that beat it on both speed-up and mean PSNR."""
    out = []
    seg = [r for r in rows if r["kind"] == "segquant" and r["speedup"] and r["psnr_mean"] is not None]
    for precision in STATIC_PRECISIONS[fmt]:
        d = next((r for r in seg if r["name"] == f"{precision} recipe"), None)
        if d is None:
            continue
        beaten_by = [r["name"] for r in seg if r is not d and r["speedup"] >= d["speedup"]
                     and r["psnr_mean"] >= d["psnr_mean"] and (r["speedup"] > d["speedup"]
                                                                 or r["psnr_mean"] > d["psnr_mean"])]
        out.append({"row": d["name"], "on_front": d["name"] in front, "beaten_by": beaten_by})
    return out


def verdicts(rows: list[dict], speed: dict[str, dict], tolerance: float = TOLERANCE) -> list[dict]:
    """Per peer: ``yes`` if a SegQuant row of its format is at least as fast (``tolerance_ms``) with a paired
    PSNR interval against the peer whose upper bound is >= 0; ``no`` with by how much otherwise; ``undetermined``
    when the peer's time or every candidate's interval is missing."""
    out = []
    for peer in (r for r in rows if r["kind"] == "peer"):
        entry = {"peer": peer["name"], "format": peer["format"], "answer": "undetermined", "witness": None}
        cands = [r for r in rows if r["kind"] == "segquant" and r["format"] == peer["format"]
                 and r["vs_peer"].get(peer["name"]) is not None]
        if peer["ms"] is None:
            entry["why"] = f"no time for the peer ({peer['speed_error']})"
        elif not cands:
            entry["why"] = "no SegQuant row with a paired PSNR interval against this peer"
        else:
            peer_rec = speed[peer["variant"]]
            timed = [r for r in cands if r["ms"] is not None]
            fast = [r for r in timed if r["ms"] <= peer["ms"] + tolerance_ms(speed[r["variant"]], peer_rec, tolerance)]
            good = [r for r in timed if r["vs_peer"][peer["name"]]["high"] >= 0]
            both = [r for r in fast if r["vs_peer"][peer["name"]]["high"] >= 0]
            if both:
                best = max(both, key=lambda r: r["vs_peer"][peer["name"]]["mean"])
                entry.update(answer="yes", witness=best["name"], d_psnr=best["vs_peer"][peer["name"]],
                             ms=best["ms"], peer_ms=peer["ms"])
            elif not timed:
                entry["why"] = "no time for any SegQuant row with a paired interval"
            else:
                entry["answer"] = "no"
                if fast:  # as fast, but significantly worse: by how much PSNR
                    best = max(fast, key=lambda r: r["vs_peer"][peer["name"]]["high"])
                    entry["closest_as_fast"] = {"row": best["name"], "d_psnr": best["vs_peer"][peer["name"]],
                                                "ms": best["ms"]}
                if good:  # not worse, but slower: by how much time
                    best = min(good, key=lambda r: r["ms"])
                    entry["closest_as_good"] = {"row": best["name"], "ms": best["ms"],
                                                "slower_pct": 100 * (best["ms"] / peer["ms"] - 1)}
        out.append(entry)
    return out


def pareto(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (speed-up, PSNR) that no other point beats on both (>= on both, > on one),
    in order of speed-up."""
    front = [i for i, (x, y) in enumerate(points)
             if not any(x2 >= x and y2 >= y and (x2 > x or y2 > y) for x2, y2 in points)]
    return sorted(front, key=lambda i: points[i][0])


# ---- output ---------------------------------------------------------------------------------------------
def build(quality: dict, records: list[dict], model: str = QUALITY_MODEL, run: str | None = None,
          tolerance: float = TOLERANCE) -> dict:
    """The whole result: per format, the joined rows, the SegQuant front and the verdicts."""
    if model not in quality.get("models", {}):
        raise SystemExit(f"{model} is not in the quality file (models: {', '.join(quality.get('models', {}))})")
    mq = quality["models"][model]
    mapping = timing_map()
    label, speed = pick_run(records, {m["variant"] for m in mapping.values()}, run)
    rows = join(mq, speed, mapping)
    formats = {}
    for fmt in PEERS:
        sub = [r for r in rows if r["format"] == fmt]
        seg = [r for r in sub if r["kind"] == "segquant" and r["speedup"] and r["psnr_mean"] is not None]
        front = [seg[i]["name"] for i in pareto([(r["speedup"], r["psnr_mean"]) for r in seg])]
        formats[fmt] = {"rows": sub, "segquant_front": front, "defaults": defaults_on_front(sub, front, fmt),
                        "verdicts": verdicts(sub, speed, tolerance)}
    first = next(iter(speed.values()), {})
    env = mq.get("environment") or quality.get("environment") or {}
    return {"quality": {"model": model, "command": env.get("command"), "device": env.get("device"),
                        "seeds": (mq.get("settings") or {}).get("seeds")},
            "speed": {"run": label, "device": first.get("device"), "torch": first.get("torch"),
                      "commands": sorted({r["command"] for r in speed.values() if r.get("command")}),
                      "bf16_ms": speed.get("bf16", {}).get("ms_median")},
            "tolerance": tolerance, "formats": formats}


def _f(v, d=2, sign=False):
    return "-" if v is None else (f"{v:+.{d}f}" if sign else f"{v:.{d}f}")


def _interval(iv) -> str:
    if iv is None:
        return "-"
    text = f"{iv['mean']:+.2f} [{iv['low']:+.2f}, {iv['high']:+.2f}]"
    return f"**{text}**" if iv.get("significant") else text


def markdown(result: dict, env: dict) -> str:
    q, s = result["quality"], result["speed"]
    lines = ["# Quality and speed, one table", "",
             f"PSNR (dB, against the full-precision samples) on {q['model']}, mean +- std over calibration seeds "
             f"(quality: `{q['command']}` on {q['device']}); time of one FLUX.1-dev-size denoiser call at 1024x1024 "
             f"from speed.py run `{s['run']}` on {s['device']} (torch {s['torch']}; bf16 {_f(s['bf16_ms'], 1)} ms). "
             f"The two use different models: PSNR says how much a configuration perturbs a trained denoiser, the "
             f"time what its kernels cost at full size. ModelOpt presets are {EQUIVALENT} (speed.py's "
             "`segquant_<fmt>_static_plain[_asshipped]`: the same formats, static per-tensor activations, no "
             "segments or DualScale; ModelOpt itself deploys through TensorRT, not available here). speed.py keeps "
             "the M = batch layers (adaLN, embedders) in bf16 in every variant and times int8 with per-channel weight "
             "scales (int8_w8a8's per-tensor weights run the same GEMM).", "",
             "dPSNR vs a peer: paired difference (row - peer) over (image, seed) pairs, 95% bootstrap interval "
             "(**bold**: excludes 0); `-`: not in quality.json. `missing`: the result files do not have it.",
             *[f"Speed command: `{c}`" for c in s["commands"]], environment_sentence(env), ""]
    for fmt, fr in result["formats"].items():
        peers = PEERS[fmt]
        lines += [f"## {fmt}", "", "| configuration | PSNR dB | timed as | ms | x bf16 | "
                  + " | ".join(f"dPSNR vs {p}" for p in peers) + " |", "|---" * (5 + len(peers)) + "|"]
        for r in fr["rows"]:
            if r["error"]:
                psnr = r["error"] if r["error"].startswith("missing") else f"failed: {r['error'][:80]}"
            else:
                psnr = (f"{_f(r['psnr_mean'])}{'' if r['psnr_std'] is None else ' +- ' + _f(r['psnr_std'])}"
                        f" ({r['runs']})")
            timed = f"`{r['variant']}`" + (f" ({r['note']})" if r["note"] else "") + (
                f" [{r['timing']}]" if r.get("timing") else "")
            ms = _f(r["ms"], 1) if r["ms"] is not None else f"missing ({(r['speed_error'] or '')[:60]})"
            name = f"**{r['name']}**" if r["kind"] == "peer" else r["name"]
            cells = [_interval(r["vs_peer"].get(p)) if r["kind"] == "segquant" else "" for p in peers]
            lines.append(f"| {name} | {psnr} | {timed} | {ms} | {_f(r['speedup'], 3)} | " + " | ".join(cells) + " |")
        lines += ["", f"SegQuant's quality-speed front ({fmt}): " + (", ".join(fr["segquant_front"]) or "missing"), ""]
        for d in fr.get("defaults", []):
            lines.append(f"Bundled recipe {d['row']}: " + ("**on the front**" if d["on_front"] else
                         "not on the front, beaten on speed and PSNR by " + ", ".join(d["beaten_by"])) + ".")
        lines += ["",
                  "Is there a SegQuant configuration at least as fast as the peer (median within the larger of "
                  f"{100 * result['tolerance']:.0f}% and the runs' combined per-call spread) whose PSNR is not "
                  "significantly lower (paired interval upper bound >= 0)?", ""]
        for v in fr["verdicts"]:
            lines.append(f"- {v['peer']}: {verdict_text(v)}")
        lines.append("")
    return "\n".join(lines)


def environment_sentence(env: dict) -> str:
    return f"This table: `{env['command']}`, git {env.get('git', '?')}."


def verdict_text(v: dict) -> str:
    if v["answer"] == "yes":
        return (f"**yes**: {v['witness']} ({_f(v['ms'], 1)} ms vs {_f(v['peer_ms'], 1)} ms, dPSNR "
                f"{_interval(v['d_psnr'])})")
    if v["answer"] == "undetermined":
        return f"undetermined: {v['why']}"
    parts = []
    if "closest_as_fast" in v:
        c = v["closest_as_fast"]
        parts.append(f"the best as-fast one, {c['row']} ({_f(c['ms'], 1)} ms), is {-c['d_psnr']['mean']:.2f} dB "
                     f"lower ({_interval(c['d_psnr'])})")
    else:
        parts.append("no SegQuant row with a paired interval is as fast")
    if "closest_as_good" in v:
        c = v["closest_as_good"]
        parts.append(f"the fastest not-worse one, {c['row']}, is {c['slower_pct']:.1f}% slower ({_f(c['ms'], 1)} ms)")
    return "**no**: " + "; ".join(parts)


def plot(result: dict, path: Path) -> None:
    fmts = list(result["formats"])
    with figure(path, 1, len(fmts), figsize=(7 * len(fmts), 5), squeeze=False) as (_, axes):
        for ax, fmt in zip(axes[0], fmts):
            fr = result["formats"][fmt]
            pts = [r for r in fr["rows"] if r["speedup"] and r["psnr_mean"] is not None]
            for r in pts:
                peer = r["kind"] == "peer"
                ax.scatter(r["speedup"], r["psnr_mean"], marker="s" if peer else "o",
                           color="tab:red" if peer else "tab:blue", s=30, zorder=3)
                ax.annotate(r["name"], (r["speedup"], r["psnr_mean"]), fontsize=5, xytext=(3, 2),
                            textcoords="offset points")
            front = [next(r for r in pts if r["name"] == n) for n in fr["segquant_front"]]
            if front:
                ax.step([r["speedup"] for r in front], [r["psnr_mean"] for r in front], where="post",
                        color="tab:blue", alpha=0.6, label="SegQuant front")
            ax.scatter([], [], marker="s", color="tab:red", label="peer preset")
            ax.scatter([], [], marker="o", color="tab:blue", label="SegQuant")
            ax.axvline(1.0, color="black", lw=0.8)
            ax.set_xlabel(f"speed-up over bf16 (FLUX.1-dev size, run {result['speed']['run']})")
            ax.set_ylabel(f"PSNR dB on {result['quality']['model']} (mean over seeds)")
            ax.set_title(fmt)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--quality", type=Path, default=RESULTS / "quality.json")
    p.add_argument("--speed", type=Path, default=RESULTS / "speed.jsonl")
    p.add_argument("--speed-run", help="the speed.py run (--run-id) to take times from (default: the run with "
                   "bf16 that measured most of the mapped variants); several, comma-separated: each variant from the "
                   "first that timed it, scaled by the bf16 ratio")
    p.add_argument("--model", default=QUALITY_MODEL)
    p.add_argument("--tolerance", type=float, default=TOLERANCE,
                   help="relative speed tolerance (floor of the noise allowance; default %(default)s)")
    args = p.parse_args(argv)
    result = build(json.loads(args.quality.read_text()), read_jsonl(args.speed), args.model, args.speed_run,
                   args.tolerance)
    env = environment()
    result["environment"] = env
    result["sources"] = {"quality": str(args.quality), "speed": str(args.speed)}
    write_results(args.out, "quality_speed", result, markdown(result, env))
    plot(result, args.out / "quality_speed.png")
    for fmt, fr in result["formats"].items():
        for v in fr["verdicts"]:
            print(f"{fmt} | {v['peer']}: {v['answer']}")


if __name__ == "__main__":
    main()

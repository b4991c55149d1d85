"""`dgport export`: a checkpoint to ONNX and/or MLX, its validation lines, and `--plan`."""
from __future__ import annotations

from pathlib import Path

import click

from .cli import _size, cli, debug_option
from .errors import DgportError


@cli.command()
@click.argument("src", metavar="CHECKPOINT", type=click.Path(path_type=Path))
@click.argument("out", metavar="OUT", required=False, type=click.Path(path_type=Path))
@click.option("--format", "formats", default="onnx", show_default=True, help="onnx, mlx or onnx,mlx.")
@click.option("--dtype", default="fp32", show_default=True, help="fp32, fp16 or bf16.")
@click.option("--quantize", default=None, callback=lambda ctx, param, v: _bits(v),
              help="Block-wise weight quantization, ONNX and MLX: int4 or int8 (or 4, 8).")
@click.option("--group-size", type=int, default=None,
              help="Quantization group size, 32, 64 or 128 (with --quantize; default 64, or 32 where 64 does not "
                   "divide the model's widths).")
@click.option("--with-logits", is_flag=True, help="ONNX: also output the fp32 logits (parity/debug exports).")
@click.option("--encoder-moe", default="auto", show_default=True,
              help="ONNX encoder experts: auto (unrolled on CPUs, sparse on GPUs), sparse (a Loop, each expert on "
                   "its routed tokens), unrolled (that loop written out), dense, or grouped (one batched product "
                   "over every expert's routed tokens).")
@click.option("--denoise-moe", default="auto", show_default=True,
              help="ONNX denoise-step experts: auto (unrolled on CPUs, dense on GPUs), sparse, unrolled, dense or "
                   "grouped.")
@click.option("--attention", default="explicit", show_default=True,
              help="ONNX attention: explicit (MatMul/Softmax/MatMul) or fused (one ONNX Attention node, opset 23).")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--text-only", is_flag=True, help="Leave the checkpoint's vision tower out: a smaller export that "
              "takes no images.")
@click.option("--no-validate", is_flag=True,
              help="Skip the comparison against the source model (which needs torch and transformers).")
@click.option("--plan", is_flag=True, help="Print the export's size and a CPU run's peak memory (from config.json "
              "alone; OUT not needed) and exit.")
@debug_option
@click.pass_context
def export(ctx, src, out, formats, dtype, quantize, group_size, with_logits, encoder_moe, denoise_moe, attention,
           force, text_only, no_validate, plan=False):
    """Export the Hugging Face DiffusionGemma checkpoint folder CHECKPOINT to the folder OUT."""
    import importlib.util

    if plan:  # nothing is read but config.json, nothing written; OUT is not needed
        from .exporters.export import ExportOptions as Opts, check_options, parse_formats
        from .exporters.plan import format_plan, format_plan_mlx, plan as make_plan, plan_mlx

        popts = Opts(formats=parse_formats(formats), dtype=dtype, quantize=quantize, group_size=group_size,
                     text_only=text_only)
        check_options(popts)
        config = _plan_config(src)
        blocks = []
        if "onnx" in popts.formats:
            blocks.append(format_plan(make_plan(config, popts), popts))
        if "mlx" in popts.formats:
            blocks.append(format_plan_mlx(plan_mlx(config, popts), popts))
        click.echo("\n".join(blocks))
        return
    if out is None:
        raise click.UsageError("Missing argument 'OUT' (the folder to export to; only --plan goes without it).")
    from rich.console import Console

    from .display import titled_table
    from .exporters.export import ExportOptions, export as run_export, parse_formats
    from .progress import RichProgress

    if quantize is None and group_size is not None:
        raise DgportError("--group-size applies only to quantized exports; add --quantize int4|int8 or drop it")
    opts = ExportOptions(formats=parse_formats(formats), dtype=dtype, quantize=quantize, group_size=group_size,
                         with_logits=with_logits, encoder_moe=encoder_moe, denoise_moe=denoise_moe,
                         attention=attention, force=force, validate=not no_validate,
                         text_only=text_only)
    console = Console(stderr=True)
    can_validate = bool(importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"))
    skipped = "validation: skipped (needs torch and transformers: pip install 'dgport[export]'; --no-validate skips it)"
    if not no_validate and not can_validate:
        console.print("dgport: " + skipped, markup=False, highlight=False, soft_wrap=True)
    from .resolve import resolve_checkpoint

    src = resolve_checkpoint(src)  # a folder, or a Hub id fetched into the Hugging Face cache
    try:
        with RichProgress(console) as progress:
            summary = run_export(src, out, opts, progress)
    except ImportError as e:
        extra = {"torch": "export", "transformers": "export", "mlx": "mlx"}.get((e.name or "").split(".")[0], "cpu")
        raise DgportError(f"exporting needs the {e.name} package, which is not installed: "
                          f"pip install 'dgport[{extra}]'") from e
    table = titled_table(console, f"exported to {summary.out} in {summary.seconds:.1f} s")
    table.add_column("file")
    table.add_column("size", justify="right")
    for rel, size in sorted(summary.files.items()):
        table.add_row(rel, _size(size))
    table.add_row("[bold]total", f"[bold]{_size(sum(summary.files.values()))}")
    console.print(table)
    if summary.validation:
        # the graph's own check (same dequantized weights) before what the quantization costs
        for name, errs in sorted(summary.validation.items(), key=lambda kv: "dequantized" not in kv[0]):
            console.print(_validation_line(name, errs, dtype, quantize), markup=False, highlight=False,
                          soft_wrap=True)
    elif no_validate:
        console.print("validation: skipped (--no-validate)")
    else:
        console.print(skipped, markup=False, highlight=False, soft_wrap=True)


def _plan_config(src: Path) -> Path:
    """The config.json `--plan` reads: CHECKPOINT/config.json, a config.json given itself, or a Hub id's
    config.json (fetched alone into the Hugging Face cache; HF_HUB_OFFLINE=1 reads only the cache)."""
    from .resolve import hub_config, is_hub_id

    if src.exists() or not is_hub_id(str(src)):
        return src
    return hub_config(str(src))


def _validation_line(name: str, errs: dict, dtype: str, quantize) -> str:
    """What validation measured and by which rule it passed."""
    from .exporters.validation import BASELINE_FACTOR, ILL_CONDITIONED, QUANT_LIMIT, tolerance

    own = {k: v for k, v in errs.items() if "_vs_" not in k}
    line = f"validation {name}: " + ", ".join(f"{k} max rel err {v:.2e}" for k, v in own.items())
    dequantized = "dequantized" in name  # the graph against the same dequantized weights: gated like fp32
    limit = tolerance(name.split()[0], "fp32" if dequantized else dtype, None if dequantized else quantize)
    if limit is None:
        bf16 = max((v for k, v in errs.items() if k.startswith("reference_bf16_")), default=0.0)
        what = (f" (int{quantize} against the unquantized fp32 model: what {quantize}-bit weights cost, not a graph "
                "error; the graph itself is checked on the dequantized weights above")
        if bf16 > ILL_CONDITIONED:
            return line + what + (f"; reported, not gated: this checkpoint has no margins, transformers' own bf16 run is "
                           f"{bf16:.2g} away from fp32, as random weights are)")
        return line + what + f"; within the {QUANT_LIMIT:g} limit)"
    refs = {k.removeprefix("reference_"): v for k, v in errs.items() if k.startswith("reference_")}
    if not refs:
        return line + f" (within the {limit:g} target)"
    exact = next(iter(refs)).rsplit("_vs_", 1)[1]
    ours = ", ".join(f"{k.rsplit('_vs_', 1)[0]} {errs[k]:.2e} vs {v:.2e}" for k, v in refs.items() if k in errs)
    return (line + f"; above the {limit:g} target, which two implementations that round differently cannot both "
            f"meet, so it passed by the relative rule instead: against a more precise transformers run ({exact}) "
            f"the export's error is at most {BASELINE_FACTOR:g}x transformers' own {dtype} error, metric by metric "
            f"({ours}): as accurate as transformers itself")



def _bits(value: str | None) -> int | None:
    if value is None:
        return None
    text = value.lower().removeprefix("int")
    if not text.isdigit():
        raise click.BadParameter(f"{value!r}: choose int4 or int8", param_hint="--quantize")
    return int(text)  # export checks the width

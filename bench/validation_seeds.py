"""Per-trajectory validation errors of one export against transformers fp32, beside transformers' own
half-precision errors on the same trajectories (what the validation fallback averages):

    python -m bench.validation_seeds CHECKPOINT EXPORT --format onnx|mlx [--dtype bf16] [--seeds 8]

One line per seed: the norm-wise errors (`exporters/validation.trace_errors`, `rel_err`) of
transformers in `--dtype` and of the export, each against transformers fp32 on `record(fp32, seed)`."""
from __future__ import annotations

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("export")
    ap.add_argument("--format", default="onnx", choices=["onnx", "mlx"])
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--seeds", type=int, default=8)
    a = ap.parse_args(argv)
    from dgport.exporters import mlx_export, onnx_export
    from dgport.exporters.checkpoint import read_checkpoint
    from dgport.exporters.validation import record, rel_err, trace_errors
    from dgport.manifest import read_manifest
    from dgport.runtimes.torch_ref import TorchRefBackend

    ckpt = read_checkpoint(a.checkpoint)
    cfg = ckpt.config
    module = {"onnx": onnx_export, "mlx": mlx_export}[a.format]
    candidate = module.validation_backends(ckpt, a.export, read_manifest(a.export).format(a.format))[0][1]()
    exact, half = TorchRefBackend(a.checkpoint, dtype="fp32"), TorchRefBackend(a.checkpoint, dtype=a.dtype)
    for seed in range(a.seeds):
        want = record(exact, cfg, seed=seed)
        ref = trace_errors(record(half, cfg, inputs=want), want, cfg, rel_err)
        ours = trace_errors(record(candidate, cfg, inputs=want), want, cfg, rel_err)
        print(f"seed {seed}: transformers {a.dtype} " + ", ".join(f"{k} {v:.4f}" for k, v in ref.items())
              + f" | {a.format} " + ", ".join(f"{k} {v:.4f}" for k, v in ours.items()), flush=True)


if __name__ == "__main__":
    main()

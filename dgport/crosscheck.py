"""`dgport check`: the same prompts and seed through several backends, compared token by token and
step by step, gated by the DESIGN.md parity targets (fp32: token-identical; fp16/bf16: >= 95 %
of tokens; quantized: reported only)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import DgportError
from .manifest import BACKEND_FORMAT, read_manifest

DEFAULT_PROMPTS = ("Why is the sky blue?", "Write a haiku about the sea.", "List three prime numbers.")


def parse_backends(text: str) -> list[tuple[str, Path | None]]:
    out = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, arg = item.partition("=")
        if name not in ("cpu", "cuda", "mlx", "torch"):
            raise DgportError(f"--backends: unknown backend {name!r}; use cpu, cuda, mlx or torch=CHECKPOINT")
        if name == "torch" and not arg:
            raise DgportError("--backends: torch needs the source checkpoint, as torch=CHECKPOINT")
        out.append((name, Path(arg) if arg else None))
    if len(out) < 2:
        raise DgportError("--backends: name at least two backends to compare, e.g. cpu,mlx")
    return out


@dataclass
class Run:
    backend: str
    tokens: list[list[int]] = field(default_factory=list)  # per prompt
    entropies: list[dict] = field(default_factory=list)  # per prompt: (canvas, step) -> entropy row


@dataclass
class CheckReport:
    runs: list[Run]
    min_agreement: float | None  # None: quantized exports, reported and not gated
    agreement: dict[str, float]  # backend -> fraction of tokens equal to the first backend's
    max_entropy_diff: dict[str, float]
    prompts_from: str = ""
    seed: int | None = None
    ok: bool = True
    failure: str = ""

    def as_dict(self) -> dict:
        return {"reference": self.runs[0].backend, "agreement": self.agreement,
                "max_entropy_diff": self.max_entropy_diff, "required_agreement": self.min_agreement,
                "prompts": self.prompts_from, "seed": self.seed, "ok": self.ok}

    def print(self) -> None:
        """The table, and the verdict when it passed (a failure is the CLI's one error line)."""
        from rich.console import Console
        from rich.markup import escape

        from .display import terminal_text, titled_table

        console = Console()
        table = titled_table(console, f"dgport check (reference: {self.runs[0].backend}; {self.prompts_from}; "
                                      f"seed {self.seed})")
        for col in ("backend", "token agreement", "max per-step entropy diff"):
            table.add_column(col)
        for run in self.runs[1:]:
            table.add_row(escape(terminal_text(run.backend)), f"{100 * self.agreement[run.backend]:.2f} %",
                          f"{self.max_entropy_diff[run.backend]:.3g}")
        console.print(table)
        if self.min_agreement is None:
            console.print("reported only: quantized exports are not held to a token agreement (4- and 8-bit "
                            "weights change tokens by design; `dgport export` validated the graph against the "
                            "dequantized weights)")
        elif self.ok:
            console.print(f"[green]OK[/green] (required agreement {100 * self.min_agreement:.0f} %; "
                            f"`--seed {self.seed}` repeats this check)")


def default_prompts(folder) -> tuple[list[str], str]:
    """The model's own check prompts (tokenizer_config.json `dgport.check_prompts`), else the built-in
    English ones; and where they came from."""
    from .task import declared

    own = declared(folder).check_prompts if folder is not None else ()
    if own:
        return list(own), f"{len(own)} check prompts of the model"
    return list(DEFAULT_PROMPTS), f"{len(DEFAULT_PROMPTS)} built-in English prompts"


def _locate(export_dir, name: str) -> Path:
    """The export a backend opens: one folder for all, or a mapping backend -> folder."""
    return Path(export_dir[name] if isinstance(export_dir, dict) else export_dir)


def check_packages(backends) -> None:
    """Refuse a backend whose packages are not installed (before anything is exported or loaded)."""
    import importlib.util

    for name, ckpt in backends:
        if name == "torch":
            if not (importlib.util.find_spec("torch") and importlib.util.find_spec("transformers")):
                raise DgportError(f"--backends torch={ckpt}: needs torch and transformers: pip install "
                                  "'dgport[export]', or leave that backend out")
            if not (Path(ckpt) / "config.json").is_file():
                raise DgportError(f"--backends torch={ckpt}: not a Hugging Face checkpoint folder (no config.json)")
            continue
        package = "onnxruntime" if BACKEND_FORMAT[name] == "onnx" else "mlx"
        if importlib.util.find_spec(package) is None:
            raise DgportError(f"--backends {name}: needs the {package} package, which is not installed: "
                              f"pip install 'dgport[{name}]', or leave that backend out")


def preflight(export_dir, backends) -> None:
    """Refuse before any model runs: a missing runtime package, checkpoint or format."""
    check_packages(backends)
    for name, _ in backends:
        if name == "torch":
            continue
        fmt = BACKEND_FORMAT[name]
        export = read_manifest(_locate(export_dir, name))
        if fmt not in export.formats:
            raise DgportError(f"{export.path}: has no {fmt} weights (it holds: {', '.join(export.formats)}), which "
                              f"--backends {name} needs; export with `dgport export CHECKPOINT OUT --format onnx,mlx` "
                              "or leave that backend out")


def _required_agreement(export_dir, backends) -> float | None:
    """The parity target: 1.0 for fp32, 0.95 for half precision, None (reported only) when quantized."""
    worst = 1.0
    for name, _ in backends:
        if name == "torch":
            continue
        manifest = read_manifest(_locate(export_dir, name)).manifest
        entry = manifest["formats"].get(BACKEND_FORMAT[name], {})
        if entry.get("quantization"):
            return None  # quantized exports are reported, not gated
        if entry.get("dtype", "fp32") != "fp32":
            worst = min(worst, 0.95)
    return worst


def run_check(export_dir, backends, prompts=None, raw=False, seed=0, max_new_tokens=None, overrides=None,
              progress=None):
    """`export_dir`: the export every backend opens, or {backend: export}. Without `prompts`, the
    model's own check prompts (or the built-in ones)."""
    from . import load
    from .progress import Progress

    progress = progress or Progress()
    preflight(export_dir, backends)
    if prompts:
        prompts, source = list(prompts), f"{len(prompts)} given prompt{'s' if len(prompts) != 1 else ''}"
    else:
        first = next((n for n, _ in backends if n != "torch"), None)
        prompts, source = default_prompts(_locate(export_dir, first) if first else backends[0][1])
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    runs = []
    for name, ckpt in backends:
        label = name if name != "torch" else f"torch={ckpt}"
        with progress.step(f"loading {label}"):
            gen = load(ckpt, backend="torch") if name == "torch" else load(_locate(export_dir, name), backend=name)
        run = Run(label)
        for prompt in progress.track(prompts, f"{label}: generating", total=len(prompts)):
            steps = {}
            res = gen.generate(prompt, seed=seed, raw=raw, max_new_tokens=max_new_tokens,
                               on_step=lambda e, s=steps: s.__setitem__((e.canvas_index, e.step), e.entropy.copy()),
                               **overrides)
            run.tokens.append(res.token_ids[0])
            run.entropies.append(steps)
        runs.append(run)
        del gen
    ref = runs[0]
    agreement, ent = {}, {}
    for run in runs[1:]:
        same = total = 0
        diff = 0.0
        for a, b, ea, eb in zip(ref.tokens, run.tokens, ref.entropies, run.entropies):
            n = max(len(a), len(b))
            same += sum(1 for x, y in zip(a, b) if x == y)
            total += n
            for key in ea.keys() & eb.keys():
                diff = max(diff, float(abs(ea[key] - eb[key]).max()))
        agreement[run.backend] = same / total if total else 1.0
        ent[run.backend] = diff
    need = _required_agreement(export_dir, backends)
    report = CheckReport(runs, need, agreement, ent, source, seed)
    worst = min(agreement, key=agreement.get)
    if need is not None and agreement[worst] < need:
        report.ok = False
        why = ("fp32 exports run the same arithmetic on every backend, so a difference is a bug worth reporting "
               "with `--json`" if need == 1.0 else
               "half precision agrees this well only where the model has margins: on random weights one rounding "
               "flips a token and the rest of the trajectory follows (transformers' own bf16 agrees with its fp32 "
               "on 3-40 % there); check a trained model, or an fp32 export for token identity")
        report.failure = (f"backend {worst} agrees with {ref.backend} on {100 * agreement[worst]:.2f} % of tokens "
                          f"({source}, seed {seed}); the parity target is {100 * need:.0f} %: {why}")
    return report

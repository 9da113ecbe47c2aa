"""`report`: pictures of a build — where the visual tokens go, and how close the graphs are to the reference.

    artifacts/ (manifest.json, recipe.yaml, graphs) [+ image]
      -> schedule.png      visual tokens kept per decoder layer vs the budget line
      -> kept_tokens.png   the image, and per stage the patches the graphs keep on it (OrtRunner),
                           plus a heat-map of how many decoder layers see each patch
      -> parity.png        histogram of the build's logits SQNR (manifest parity; inf counted at a cap)
      -> report.md         the three figures with a few numbers
      -> .quota_export-report   what `report` wrote there (names and sha256)

`report` overwrites only the files its own marker lists with their current hash: a file of those
names that it did not write (or that was changed since) is an error line naming it, and nothing is
written. Each file is written under a temporary name and renamed into place.

The visual tokens are the patch grid of the image in row-major order (LLaVA: the CLS token, if the
model keeps it, first); the grid is derived from the manifest's n_visual and image size.
matplotlib (Agg) is imported only here.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quota_export import UserError
from quota_export.verify import SAMPLE_SQNR_DB as SQNR_THRESHOLD_DB

DEFAULT_PROMPT = "describe the image"
SHAPES_TEST = Path(__file__).resolve().parents[1] / "calib_data" / "shapes" / "test.jsonl"
SHAPES_SIZE = (96, 96)


REPORT_MARKER = ".quota_export-report"
REPORT_FILES = ("report.md", "schedule.png", "kept_tokens.png", "parity.png")


@dataclass
class Report:
    md: Path
    pngs: list[Path]
    answer: str


# ---------------------------------------------------------------- small pure helpers
def patch_grid(n_visual: int, image_size: tuple[int, int]) -> tuple[int, int, int]:
    """(rows, cols, offset): the n_visual tokens as a rows x cols patch grid of an HxW image;
    offset 1 when a leading CLS token is kept (n_visual = rows*cols + 1)."""
    h, w = image_size
    for offset in (0, 1):
        n = n_visual - offset
        if n <= 0:
            continue
        # the divisor pair whose aspect is closest to the image's (patches are square)
        best = min(((abs(math.log((n // c) / c * w / h)), n // c, c) for c in range(1, n + 1) if n % c == 0))
        if best[0] < math.log(1.1):
            return best[1], best[2], offset
    raise UserError(f"manifest: cannot lay {n_visual} visual tokens out as a patch grid of a {w}x{h} image")


def layers_seen(kept: list[np.ndarray], stage_layers: list[int], n_visual: int, num_layers: int) -> np.ndarray:
    """Decoder layers that hold each visual token: a token dropped at the stage at layer l is seen by l layers."""
    seen = np.full(n_visual, num_layers, dtype=np.int64)
    alive = np.ones(n_visual, dtype=bool)
    for k, layer in zip(kept, stage_layers):
        now = np.zeros(n_visual, dtype=bool)
        now[np.asarray(k).reshape(-1)] = True
        dropped = alive & ~now
        seen[dropped] = layer
        alive &= now
    return seen


def sqnr_values(values: list, cap: float | None = None) -> tuple[np.ndarray, int, float]:
    """(finite values, number of 'inf' entries, the cap at which inf entries are drawn)."""
    finite = np.array([float(v) for v in values if not (isinstance(v, str) or math.isinf(float(v)))], dtype=np.float64)
    n_inf = len(values) - len(finite)
    if cap is None:
        top = float(finite.max()) if len(finite) else SQNR_THRESHOLD_DB
        cap = max(SQNR_THRESHOLD_DB + 20.0, 10.0 * math.ceil(top / 10.0) + 10.0)
    return finite, n_inf, cap


def default_image(image_size: tuple[int, int]) -> tuple[Path, str]:
    """The first sample of the shipped shapes test split (its image and question), for 96x96 models."""
    from quota_export.data import load_bench

    if tuple(image_size) != SHAPES_SIZE:
        raise UserError(
            f"--image: required for this model ({image_size[1]}x{image_size[0]} images; the default image is "
            f"the shapes benchmark's, {SHAPES_SIZE[1]}x{SHAPES_SIZE[0]})"
        )
    if not SHAPES_TEST.is_file():
        raise UserError(f"--image: required ({SHAPES_TEST} not found for the default image)")
    s = load_bench(SHAPES_TEST, limit=1)[0]
    return Path(s.image), s.question


# ---------------------------------------------------------------- figures
def _plt():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise UserError("report: needs matplotlib (pip install matplotlib)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_schedule(kept_per_layer: list[int], n_visual: int, budget: float, stages: list[dict], title: str, path: Path) -> None:
    """Bars: visual tokens held by each decoder layer; lines: all tokens, the budget, the mean kept."""
    plt = _plt()
    L = len(kept_per_layer)
    mean = sum(kept_per_layer) / L
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * L + 3), 4.0), dpi=110)
    x = np.arange(L)
    stage_layers = {s["layer"] for s in stages}
    colors = ["#d95f02" if l in stage_layers else "#1b9e77" for l in x]
    ax.bar(x, kept_per_layer, color=colors, width=0.8, label="visual tokens kept (orange: a pruning stage)")
    ax.axhline(n_visual, color="0.4", lw=1, ls=":", label=f"all visual tokens ({n_visual})")
    ax.axhline(budget * n_visual, color="#7570b3", lw=1.5, ls="--", label=f"budget: mean <= {budget:g} x {n_visual} = {budget * n_visual:.1f}")
    ax.axhline(mean, color="#e7298a", lw=1.5, label=f"mean kept: {mean:.1f} ({mean / n_visual:.3f})")
    for s in stages:
        ax.annotate(f"k={s['keep']}", (s["layer"], s["keep"]), textcoords="offset points", xytext=(0, 3), ha="center", fontsize=8)
    ax.set_xticks(x if L <= 40 else x[:: max(1, L // 20)])
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("visual tokens")
    ax.set_ylim(0, n_visual * 1.18)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_kept(image: np.ndarray, kept: list[np.ndarray], stages: list[dict], n_visual: int, num_layers: int,
              title: str, path: Path) -> None:
    """The image; per stage the image with dropped patches dimmed; a heat-map of layers seen per patch."""
    plt = _plt()
    from matplotlib.colors import BoundaryNorm
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    rows, cols, off = patch_grid(n_visual, (h, w))
    n_grid = rows * cols
    panels = 2 + len(stages)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels + 0.6, 3.2), dpi=110)
    axes = np.atleast_1d(axes)
    ext = (0, w, h, 0)
    axes[0].imshow(image, extent=ext)
    axes[0].set_title(f"image ({rows}x{cols} patches)", fontsize=8)
    ph, pw = h / rows, w / cols
    for ax, k, s in zip(axes[1:], kept, stages):
        mask = np.zeros(n_visual, dtype=bool)
        mask[np.asarray(k).reshape(-1)] = True
        grid = mask[off:off + n_grid].reshape(rows, cols)
        shade = np.zeros((rows, cols, 4), dtype=np.float32)
        shade[~grid] = (0.0, 0.0, 0.0, 0.8)  # dropped: dimmed
        ax.imshow(image, extent=ext)
        ax.imshow(shade, extent=ext, interpolation="nearest")
        for r, c in zip(*np.nonzero(grid)):  # kept: outlined
            ax.add_patch(Rectangle((c * pw, r * ph), pw, ph, fill=False, edgecolor="#ffd400", lw=0.6))
        ax.set_title(f"layer {s['layer']}: keeps {int(mask.sum())}/{n_visual}", fontsize=8)
    seen = layers_seen(kept, [s["layer"] for s in stages], n_visual, num_layers)
    ax = axes[-1]
    ax.imshow(image, extent=ext)
    levels = sorted({num_layers, *(s["layer"] for s in stages)})  # the values that occur
    cmap = plt.get_cmap("viridis", len(levels))
    norm = BoundaryNorm([v - 0.5 for v in levels] + [levels[-1] + 0.5], cmap.N)
    hm = ax.imshow(seen[off:off + n_grid].reshape(rows, cols), extent=ext, cmap=cmap, norm=norm, alpha=0.75,
                   interpolation="nearest")
    ax.set_title("decoder layers that hold each patch", fontsize=8)
    cb = fig.colorbar(hm, ax=ax, fraction=0.046, pad=0.04, ticks=levels, spacing="uniform")
    cb.ax.tick_params(labelsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_parity(values: list, title: str, path: Path) -> tuple[int, int, float]:
    """Histogram of logits SQNR (dB); 'inf' (bit-identical logits) drawn as one bar at the cap.
    Returns (finite count, inf count, cap)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    finite, n_inf, cap = sqnr_values(values)
    fig, ax = plt.subplots(figsize=(6.0, 3.6), dpi=110)
    lo = min(0.0, float(finite.min()) - 5 if len(finite) else 0.0)
    bins = np.arange(5 * math.floor(lo / 5), cap + 5, 5.0)
    if len(finite):
        ax.hist(finite, bins=bins, color="#1b9e77", edgecolor="white", label=f"finite ({len(finite)})")
    if n_inf:
        ax.bar([cap], [n_inf], width=4.0, color="#d95f02", label=f"inf = identical logits ({n_inf}), drawn at {cap:g}")
    ax.axvline(SQNR_THRESHOLD_DB, color="#7570b3", ls="--", lw=1.5, label=f"parity threshold {SQNR_THRESHOLD_DB:g} dB")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("last-position logits SQNR vs reference.py (dB)")
    ax.set_ylabel("samples")
    ax.set_xlim(bins[0], cap + 5)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(finite), n_inf, cap


# ---------------------------------------------------------------- the command
def _manifest(artifacts: Path) -> dict:
    man = artifacts / "manifest.json"
    if not artifacts.is_dir():
        raise UserError(f"{artifacts}: artifacts folder not found")
    if not man.is_file():
        raise UserError(f"{man}: missing (not a quota_export build output)")
    try:
        return json.loads(man.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{man}: corrupt manifest") from None



def _shown(path: Path) -> str:
    """The path as the report prints it: relative to the working directory when under it (so a
    committed report does not name the machine it was made on)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)

def write_report(artifacts: str | Path, image: str | Path | None = None, out: str | Path | None = None,
                 prompt: str | None = None) -> Report:
    """Write schedule.png, kept_tokens.png, parity.png (if the manifest has a parity report) and report.md."""
    from quota_export.data import load_image
    from quota_export.recipe import load_recipe
    from quota_export.runtime.ort import OrtRunner

    _plt()  # fail early, before any work, when matplotlib is missing
    artifacts = Path(artifacts)
    man = _manifest(artifacts)
    recipe = load_recipe(artifacts / "recipe.yaml")
    m = man["model"]
    n_visual, num_layers = int(m["n_visual"]), int(m["num_layers"])
    image_size = tuple(m["image_size"])
    kept_per_layer = man.get("kept_per_layer") or recipe.kept_per_layer(num_layers)
    stages = man.get("schedule", [])
    budget = recipe.pruning.budget

    question = prompt
    if image is None:
        image, q = default_image(image_size)
        question = question or q
    image = Path(image)
    if not image.is_file():
        raise UserError(f"{image}: image not found")
    question = question or DEFAULT_PROMPT
    img = load_image(image)
    if img.shape[:2] != image_size:
        raise UserError(f"{image}: image is {img.shape[1]}x{img.shape[0]}, these graphs take {image_size[1]}x{image_size[0]}")

    out = Path(out) if out is not None else artifacts / "report"
    own = _claim(out)
    res = OrtRunner(artifacts).generate(img, question)
    kept = [np.asarray(k).reshape(-1) for k in res.kept]

    name = man.get("recipe", artifacts.name)
    pngs = [out / "schedule.png", out / "kept_tokens.png"]
    with _placed(pngs[0]) as p:
        plot_schedule(kept_per_layer, n_visual, budget, stages, f"{name}: visual tokens per decoder layer", p)
    with _placed(pngs[1]) as p:
        plot_kept(img, kept, stages, n_visual, num_layers, f"{image.name}: \"{question}\" -> \"{res.text}\"", p)
    parity = man.get("parity") or {}
    sq = parity.get("logits_sqnr_db")
    par_line = "no parity report in the manifest"
    if sq:
        pngs.append(out / "parity.png")
        with _placed(pngs[2]) as p:
            n_fin, n_inf, cap = plot_parity(sq, f"{name}: parity of the graphs vs reference.py", p)
        from quota_export.verify import summary_line

        par_line = summary_line(parity, parity.get("data")) + f" ({n_inf} of {n_fin + n_inf} bit-identical: drawn at {cap:g} dB)"

    mean = sum(kept_per_layer) / num_layers
    md = [
        f"# Report: {name}",
        "",
        f"Artifacts `{artifacts}` (target {man.get('target', 'onnx')}, {m.get('architecture', '?')}, "
        f"{num_layers} decoder layers, {n_visual} visual tokens per image, recipe hash {man.get('recipe_hash', '?')[:12]}).",
        "",
        "## Allocation schedule",
        "",
        "![schedule](schedule.png)",
        "",
        "Stages: " + (", ".join(f"layer {s['layer']} keeps {s['keep']}" + (" (max-min selection)" if s.get("select") == "maxmin" else "")
                     for s in stages) or "none (no pruning)")
        + f". Mean kept {mean:.1f} = {mean / n_visual:.3f} of {n_visual} (budget {budget:g})."
        + (" Dropped tokens are merged into their most similar kept token (`pruning.merge: proportional`)."
           if recipe.pruning.merge == "proportional" and stages else ""),
        "",
        "Visual tokens per layer: " + ", ".join(str(k) for k in kept_per_layer) + ".",
        "",
        "## Kept tokens on an image",
        "",
        "![kept tokens](kept_tokens.png)",
        "",
        f"Image `{_shown(image)}`, question \"{question}\", answer of the graphs \"{res.text}\" (ONNX Runtime). "
        "Outlined patches are the ones a stage keeps (dimmed: dropped); the last panel counts the decoder layers that hold each patch.",
        "",
        "## Parity",
        "",
    ]
    if sq:
        md += ["![parity](parity.png)", ""]
    md += [par_line + ".", ""]
    with _placed(out / "report.md") as p:
        p.write_text("\n".join(md))
    written = {q.name for q in pngs} | {"report.md"}
    for stale in own - written:  # e.g. a parity.png of an earlier report: ours, unchanged
        (out / stale).unlink(missing_ok=True)
    _seal(out, sorted(written))
    return Report(out / "report.md", pngs, res.text)


def _claim(out: Path) -> set[str]:
    """Check that `report` may write its files into `out` (creating it); returns the names of the
    files there that an earlier `report` wrote and that are unchanged since (it may replace them)."""
    from quota_export.publish import file_entry

    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise UserError(f"{out}: output path exists and is not a folder (choose another --out)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{out}: cannot create output folder ({e.strerror})") from None
    try:
        marker = json.loads((out / REPORT_MARKER).read_text(encoding="utf-8"))
        listed = marker["files"] if isinstance(marker, dict) and isinstance(marker.get("files"), dict) else {}
    except (OSError, ValueError, RecursionError):
        listed = {}
    own = set()
    for name in REPORT_FILES:
        p = out / name
        if not (p.exists() or p.is_symlink()):
            continue
        if p.is_symlink() or not p.is_file() or listed.get(name) != file_entry(p):
            raise UserError(f"{p}: exists and was not written by `report` (or was changed since); "
                            "move it away or choose another --out")
        own.add(name)
    return own


class _placed:
    """`with _placed(path) as tmp:` write tmp; on success it is renamed to path (atomic), on
    failure removed: a reader never sees a half-written file."""

    def __init__(self, path: Path):
        import os

        self.path, self.tmp = path, path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.tmp.replace(self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def _seal(out: Path, names: list[str]) -> None:
    from quota_export.publish import file_entry

    with _placed(out / REPORT_MARKER) as p:
        p.write_text(json.dumps({"files": {n: file_entry(out / n) for n in names}}, indent=1) + "\n")

"""The fidelity study's fixed definitions and everything derived from its per-run files (issue 23).

What is defined here was fixed before the study's runs: the arms (:data:`ARMS`), the table rows
(:data:`TABLE`) and the claims with their primary metrics (:data:`CLAIMS`). The rest turns the per-run files
``bench/results/fidelity/<arm>-s<seed>.json`` and ``study.json`` into ``fidelity.json``, ``fidelity.md``,
``fidelity.png`` and the README block, and checks that the committed ones are exactly that
(:func:`check`). ``bench/fidelity.py`` trains and evaluates; this module never loads a model.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GEMMA, SMOLLM = "gemma3-270m", "smollm2-135m"
ONE_PROMPT = "one-prompt"  #: facet selection: raw + the first facet of the short and of the long group
MODES = ("single", "multi")
BEGIN, END = "<!-- fidelity:begin -->", "<!-- fidelity:end -->"
BOOTSTRAP = 10_000
_REPO = Path(__file__).resolve().parent.parent  #: a reference study inside the repository is named from its root
HOLD_P = 2 / 2**5  #: the smallest exact sign-flip p of 5 seeds (all agree in sign); fewer seeds never "hold"


@dataclass(frozen=True)
class Arm:
    """One arm of the study.

    Attributes:
        name: arm name in the results.
        llm: the stage-1 cache it reads (for ``clip_scratch``: only to select the same training keys).
        text: ``"cache"`` (all facets of ``llm``'s cache), ``"raw"`` (only the raw facet), ``ONE_PROMPT``
            (raw + short facet 1 + long facet 1) or ``"tower"`` (a text tower from scratch).
        positives: ``data.positives``.
        describe: the text side in words.
    """

    name: str
    llm: str
    text: str
    positives: int
    describe: str


ARMS = {a.name: a for a in (
    Arm("flame", GEMMA, "cache", 6, "Gemma-3-270M, 11 facets, P = 6"),
    Arm("flame_one_prompt", GEMMA, ONE_PROMPT, 3, "Gemma-3-270M, raw/short/long one prompt each, P = 3"),
    Arm("raw_only", GEMMA, "raw", 1, "Gemma-3-270M, raw prompt only, P = 1"),
    Arm("clip_scratch", GEMMA, "tower", 6, "text tower from scratch ({layers} x {width}), raw/short/long sampled"),
    Arm("flame_english_llm", SMOLLM, "cache", 6, "SmolLM2-135M, 11 facets, P = 6"),
)}

#: (row label, "<mode>:<task>/<metric>") of the Markdown table and the plot.
TABLE = [
    ("names I→T R@1, single", "single:retrieval_en_raw/text_retrieval_recall@1"),
    ("names I→T R@1, multi", "multi:retrieval_en_raw/text_retrieval_recall@1"),
    ("names I→T R@5, single", "single:retrieval_en_raw/text_retrieval_recall@5"),
    ("names I→T R@5, multi", "multi:retrieval_en_raw/text_retrieval_recall@5"),
    ("names T→I R@1, single", "single:retrieval_en_raw/image_retrieval_recall@1"),
    ("names T→I R@1, multi", "multi:retrieval_en_raw/image_retrieval_recall@1"),
    ("long I→T R@1, multi", "multi:retrieval_en_long/text_retrieval_recall@1"),
    ("long T→I R@1, multi", "multi:retrieval_en_long/image_retrieval_recall@1"),
    ("category top-1", "single:classification_category/acc1"),
    ("category mean per-class recall", "single:classification_category/mean_per_class_recall"),
    ("subcategory top-1", "single:classification_subcategory/acc1"),
    ("subcategory mean per-class recall", "single:classification_subcategory/mean_per_class_recall"),
    ("multilingual mean I→T R@1", "single:multilingual_mean/text_retrieval_recall@1"),
    ("multilingual mean T→I R@1", "single:multilingual_mean/image_retrieval_recall@1"),
]

NAMES_R5_MULTI = "multi:retrieval_en_raw/text_retrieval_recall@5"
LONG_R1 = "multi:retrieval_en_long/text_retrieval_recall@1"
CAT_MPCR = "single:classification_category/mean_per_class_recall"

#: The claims and their primary metrics, chosen before the runs: (id, arm A, arm B, claim "A > B", metrics).
#: Every TABLE metric is also reported for every claim as secondary (not counted in "holds").
CLAIMS = [
    ("prompts", "flame", "flame_one_prompt", "more prompts (11 facets) beat one prompt per caption, same captions",
     [NAMES_R5_MULTI, LONG_R1, CAT_MPCR]),
    ("content", "flame_one_prompt", "raw_only", "short and long captions add to the raw prompt (one prompt each)",
     [NAMES_R5_MULTI, LONG_R1, CAT_MPCR]),
    ("llm_vs_scratch", "flame", "clip_scratch", "a frozen LLM beats a text tower trained from scratch",
     ["single:retrieval_en_raw/text_retrieval_recall@5", LONG_R1, CAT_MPCR]),
    ("english_llm_vs_scratch", "flame_english_llm", "clip_scratch", "an English-only frozen LLM beats scratch too",
     ["single:retrieval_en_raw/text_retrieval_recall@5", LONG_R1, CAT_MPCR]),
    ("multilingual", "flame", "flame_english_llm", "multilingual Gemma beats English-only SmolLM2 on other languages",
     ["single:multilingual_mean/text_retrieval_recall@1", "single:multilingual_mean/image_retrieval_recall@1"]),
]


def run_file(out: Path, arm: str, seed: int) -> Path:
    return out / "fidelity" / f"{arm}-s{seed}.json"



# ---- statistics ---------------------------------------------------------------------------------------------


def sign_flip_p(diffs: np.ndarray) -> float:
    """Exact two-sided sign-flip permutation p of the mean of paired differences ``float [n]`` (all ``2^n``
    sign patterns; a pattern counts when its |mean| >= the observed |mean| - 1e-12). 1.0 for all-zero diffs."""
    d = np.asarray(diffs, np.float64)
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(d))))
    stats = np.abs(signs @ d) / len(d)
    return float(np.mean(stats >= abs(d.mean()) - 1e-12))


def bootstrap_ci(diffs: np.ndarray, resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float]:
    """Percentile 95 % interval of the mean of ``diffs`` over ``resamples`` resamples with replacement
    (``numpy.random.default_rng(seed)``; deterministic)."""
    d = np.asarray(diffs, np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def paired(a: list[float], b: list[float]) -> dict[str, Any]:
    """Paired (same seed) comparison A - B: ``{"diffs", "mean", "ci95", "p", "wins", "holds"}``; ``holds`` =
    the bootstrap interval is above 0 and ``p <= HOLD_P`` (so it needs at least 5 seeds)."""
    d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    lo, hi = bootstrap_ci(d)
    p = sign_flip_p(d)
    return {"diffs": [float(x) for x in d], "mean": float(d.mean()), "ci95": [lo, hi], "p": p,
            "wins": int((d > 0).sum()), "holds": bool(lo > 0 and p <= HOLD_P + 1e-12)}


# ---- the derived document -----------------------------------------------------------------------------------


def aggregate(values: list[float]) -> dict[str, Any]:
    """``{"mean", "std" (sample, ddof=1; 0 for one value), "values"}``."""
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "values": [float(v) for v in values]}


def load_runs(out: Path, arms: list[str], seeds: list[int]) -> dict[str, dict[int, dict[str, Any]]]:
    """The per-run files of ``out/fidelity/`` that exist: ``{arm: {seed: record}}``."""
    runs: dict[str, dict[int, dict[str, Any]]] = {}
    for arm in arms:
        for seed in seeds:
            path = run_file(out, arm, seed)
            if path.exists():
                runs.setdefault(arm, {})[seed] = json.loads(path.read_text(encoding="utf-8"))
    return runs


def multilingual_rows(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per language (single mode): mean R@1 both directions and hits / queries summed over the seeds."""
    out = {}
    for key in sorted(records[0]["task_counts"]):
        if not key.startswith("single:multilingual_"):
            continue
        lang = key.split("multilingual_", 1)[1]
        counts = records[0]["task_counts"][key]
        row = {}
        for direction, metric, n_key in (("i2t", "text_retrieval_recall@1", "n_image_queries"),
                                          ("t2i", "image_retrieval_recall@1", "n_text_queries")):
            vals = [r["metrics"][f"{key}/{metric}"] for r in records]
            n = counts[n_key]
            row[direction] = {"mean": float(np.mean(vals)), "hits": int(round(sum(v * n for v in vals))),
                              "queries": n * len(vals), "chance": records[0]["chance"][f"{key}/{metric}"]}
        out[lang] = row
    return out


def build_document(out: Path) -> dict[str, Any]:
    """``fidelity.json`` from ``out/fidelity/study.json`` and the per-run files only: arms with every seed
    finished, their aggregates, per-language hits, baselines and the paired claims whose two arms are complete."""
    study = json.loads((out / "fidelity" / "study.json").read_text(encoding="utf-8"))
    seeds = study["seeds"]
    runs = load_runs(out, study["arms"], seeds)
    complete = [a for a in study["arms"] if len(runs.get(a, {})) == len(seeds)]
    doc: dict[str, Any] = {"study": study, "complete_arms": complete,
                           "incomplete_arms": {a: sorted(runs.get(a, {})) for a in study["arms"] if a not in complete},
                           "arms": {}, "claims": []}
    for arm in complete:
        recs = [runs[arm][s] for s in seeds]
        keys = [k for k in recs[0]["metrics"] if all(k in r["metrics"] for r in recs)]
        doc["arms"][arm] = {
            "text_side": ARMS[arm].describe.format(**study["text_tower"]) if arm in ARMS else arm,
            "metrics": {k: aggregate([r["metrics"][k] for r in recs]) for k in keys},
            "chance": recs[0]["chance"], "multilingual": multilingual_rows(recs),
            "runs": [{"seed": s, "inputs_hash": r["inputs_hash"], "first_loss": r["first_loss"],
                      "final_loss": r["final_loss"], "train_seconds": r["train_seconds"],
                      "eval_seconds": r["eval_seconds"]} for s, r in zip(seeds, recs)],
        }
    for cid, a, b, claim, primary in CLAIMS:
        if a not in doc["arms"] or b not in doc["arms"]:
            continue
        ma, mb = doc["arms"][a]["metrics"], doc["arms"][b]["metrics"]
        metrics = list(dict.fromkeys([*primary, *(k for _, k in TABLE)]))
        tests = {k: paired(ma[k]["values"], mb[k]["values"]) | {"primary": k in primary}
                 for k in metrics if k in ma and k in mb}
        doc["claims"].append({"id": cid, "a": a, "b": b, "claim": claim, "primary": primary, "tests": tests,
                              "primary_holding": sum(tests[k]["holds"] for k in primary if k in tests)})
    if study.get("reference"):
        doc["reference"] = reference_verdicts(out / study["reference"], doc["claims"])
        where = (out / study["reference"]).resolve()
        doc["reference"]["name"] = where.relative_to(_REPO).as_posix() if where.is_relative_to(_REPO) else study["reference"]
    return doc


def reference_verdicts(ref_out: Path, claims: list[dict[str, Any]]) -> dict[str, Any]:
    """Does a reference study (the same arms and claims on another training set, e.g. the demo-subset round in
    ``bench/results`` for a whole-split run) give the same verdict on each pre-chosen metric?

    Returns:
        ``{"name", "train_set", "rows": [{"claim", "metric", "this": {mean, ci95, holds}, "reference": {...},
        "same": bool}], "same": n, "compared": n}``; a metric counts as the same verdict when it holds in both
        or in neither. Derived from the reference's per-run files (:func:`build_document`).
    """
    ref = build_document(ref_out)  # ref_out: the reference's folder, relative to this study's (as stored)
    ref_claims = {c["id"]: c for c in ref["claims"]}
    rows = []
    for c in claims:
        rc = ref_claims.get(c["id"])
        for k in c["primary"]:
            if rc is None or k not in rc["tests"] or k not in c["tests"]:
                continue
            this, other = ({f: t[k][f] for f in ("mean", "ci95", "holds")} for t in (c["tests"], rc["tests"]))
            rows.append({"claim": c["id"], "a": c["a"], "b": c["b"], "metric": k, "this": this, "reference": other,
                         "same": this["holds"] == other["holds"]})
    return {"name": ref_out.as_posix(), "train_set": _train_set(ref["study"]), "rows": rows,
            "same": sum(r["same"] for r in rows), "compared": len(rows)}


# ---- rendering ----------------------------------------------------------------------------------------------

_LABEL = {k: c for c, k in TABLE}


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _baseline_cells(doc: dict[str, Any], key: str) -> tuple[str, str]:
    """(uniform chance, most-common class) of a table metric, in %; '-' where it has none."""
    arms = doc["arms"]
    chance = next(iter(arms.values()))["chance"].get(key) if arms else None
    task = key.split(":", 1)[1].split("/", 1)[0]
    b = doc["study"]["baselines"].get(task)
    common = "-"
    if b and key.endswith("/acc1"):
        common = _pct(b["most_common_acc1"])
    elif b and key.endswith("/mean_per_class_recall"):
        common = _pct(b["most_common_mean_per_class_recall"])
    return (_pct(chance) if chance is not None else "-"), common


def claim_sentence(c: dict[str, Any], n: int) -> str:
    """One sentence per claim, from its numbers only."""
    held = [k for k in c["primary"] if c["tests"].get(k, {}).get("holds")]
    parts = []
    for k in c["primary"]:
        t = c["tests"][k]
        parts.append(f"{_LABEL.get(k, k)} {100 * t['mean']:+.1f} [{100 * t['ci95'][0]:+.1f}, "
                     f"{100 * t['ci95'][1]:+.1f}], {t['wins']}/{n} seeds, p = {t['p']:.3f}")
    if len(held) == len(c["primary"]):
        verdict = "holds on every pre-chosen metric"
    elif held:
        verdict = f"holds on {len(held)} of {len(c['primary'])} pre-chosen metrics only"
    else:
        reverse = [k for k in c["primary"] if c["tests"][k]["ci95"][1] < 0 and c["tests"][k]["wins"] == 0]
        verdict = ("does not hold; the opposite holds on " + ", ".join(_LABEL.get(k, k) for k in reverse)
                   if reverse else "does not hold at this scale (not decided by these seeds)")
    return f"**`{c['a']}` > `{c['b']}`** ({c['claim']}): {verdict} ({'; '.join(parts)})."


def render_table(doc: dict[str, Any]) -> str:
    """The results table (rows: metrics; columns: arms, uniform chance, most-common class), mean ± std in %."""
    arms = list(doc["arms"])
    lines = ["| metric (%) | " + " | ".join(f"`{a}`" for a in arms) + " | chance | most common class |",
             "|---" * (len(arms) + 3) + "|"]
    for label, key in TABLE:
        cells = [f"{_pct(doc['arms'][a]['metrics'][key]['mean'])} ± {_pct(doc['arms'][a]['metrics'][key]['std'])}"
                 if key in doc["arms"][a]["metrics"] else "-" for a in arms]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(_baseline_cells(doc, key)) + " |")
    return "\n".join(lines) + "\n"


def _train_set(study: dict[str, Any]) -> str:
    """The training set in words, from ``study.json`` (a study without ``train_bases`` is the demo subset)."""
    rows = study.get("split_rows", {}).get("train")
    if study.get("train_bases", 300) == "all":
        return f"the whole emoji train split ({rows:,} images, skin-tone variants included)"
    return (f"the demo subset ({study.get('train_bases', 300)} base concepts"
            + (f", {rows:,} images" if rows else "") + ")")


def _test_rows(study: dict[str, Any]) -> str:
    rows = study.get("split_rows", {}).get("test")
    return f", {study.get('test_bases', 150)} base concepts, {rows:,} images" if rows else ""


def render_summary(doc: dict[str, Any]) -> str:
    """What the README shows: one line of setup, the table, one sentence per claim."""
    s = doc["study"]
    n = len(s["seeds"])
    head = (f"Trained on {_train_set(s)}; evaluated on the emoji test split (unseen concepts"
            f"{_test_rows(s)}). {n} seeds per arm ({', '.join(map(str, s['seeds']))}), "
            f"{s['steps']} steps x {s['batch_size']} images per run, mean ± std over seeds. "
            f"Machine: {s['cpu']}.")
    if doc["incomplete_arms"]:
        head += " Not reported (seeds unfinished): " + ", ".join(
            f"`{a}` ({len(v)} of {n} seeds)" for a, v in doc["incomplete_arms"].items()) + "."
    lines = [head, "", render_table(doc).rstrip("\n"), "",
             f"Paired differences A - B over the {n} seeds (percentage points, bootstrap 95 % interval, exact "
             f"sign-flip p; the smallest p {n} seeds can give is {2 / 2 ** n:.4f}). A claim holds on a metric when the "
             f"interval is above 0 and p <= {HOLD_P:.4f}; its metrics were chosen before the run; no correction for "
             "multiple comparisons:", ""]
    lines += [f"- {claim_sentence(c, n)}" for c in doc["claims"]]
    ref = doc.get("reference")
    if ref and ref["compared"]:
        lines += ["", f"The same study on {ref['train_set']} (`{ref['name']}`) gives the same verdict "
                  f"(holds / does not hold) on {ref['same']} of {ref['compared']} pre-chosen metrics"
                  + ("." if ref["same"] == ref["compared"] else ", and differs on " + "; ".join(
                      f"`{r['a']}` > `{r['b']}` {_LABEL.get(r['metric'], r['metric'])} (here "
                      f"{'holds' if r['this']['holds'] else 'does not hold'})" for r in ref["rows"] if not r["same"])
                     + ".")]
    return "\n".join(lines) + "\n"


def render_reference(doc: dict[str, Any]) -> list[str]:
    """``fidelity.md``'s section comparing each pre-chosen metric's verdict with the reference study."""
    ref = doc.get("reference")
    if not ref:
        return []
    lines = [f"## The same claims on {ref['train_set']} (`{ref['name']}`)", "",
             "| claim | metric | this study: diff (pp) [95 %] | holds | reference: diff (pp) [95 %] | holds | "
             "same verdict |", "|---|---|---|---|---|---|---|"]

    def cell(t: dict[str, Any]) -> str:
        return (f"{100 * t['mean']:+.1f} [{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}] | "
                f"{'yes' if t['holds'] else 'no'}")

    for r in ref["rows"]:
        lines.append(f"| `{r['a']}` > `{r['b']}` | {_LABEL.get(r['metric'], r['metric'])} | {cell(r['this'])} | "
                     f"{cell(r['reference'])} | {'yes' if r['same'] else '**no**'} |")
    return [*lines, ""]


def render_markdown(doc: dict[str, Any]) -> str:
    """``fidelity.md``: the summary, every claim's full test table, per-language hits, per-run losses."""
    s = doc["study"]
    n = len(s["seeds"])
    lines = ["# Fidelity study (bench/fidelity.py)", "", render_summary(doc).rstrip("\n"), ""]
    for c in doc["claims"]:
        lines += [f"## `{c['a']}` - `{c['b']}`: {c['claim']}", "",
                  "| metric | primary | mean diff (pp) | bootstrap 95 % | wins | sign-flip p | holds |",
                  "|---|---|---|---|---|---|---|"]
        for k, t in c["tests"].items():
            lines.append(f"| {_LABEL.get(k, k)} | {'yes' if t['primary'] else ''} | {100 * t['mean']:+.1f} | "
                         f"[{100 * t['ci95'][0]:+.1f}, {100 * t['ci95'][1]:+.1f}] | {t['wins']}/{n} | "
                         f"{t['p']:.4f} | {'yes' if t['holds'] else 'no'} |")
        lines.append("")
    lines += render_reference(doc)
    if doc["arms"]:
        langs = list(next(iter(doc["arms"].values()))["multilingual"])
        lines += ["## Multilingual retrieval per language (single mode), R@1 %, hits / queries summed over seeds",
                  "", "| language | direction | " + " | ".join(f"`{a}`" for a in doc["arms"]) + " | chance |",
                  "|---" * (len(doc["arms"]) + 3) + "|"]
        for lang in langs:
            for d, name in (("i2t", "I→T"), ("t2i", "T→I")):
                cells = [f"{_pct(v['mean'])} ({v['hits']}/{v['queries']})" for v in
                         (doc["arms"][a]["multilingual"][lang][d] for a in doc["arms"])]
                chance = next(iter(doc["arms"].values()))["multilingual"][lang][d]["chance"]
                lines.append(f"| {lang} | {name} | " + " | ".join(cells) + f" | {_pct(chance)} |")
        lines.append("")
    lines += ["## Baselines of the classification tasks", "",
              "| task | classes | test images | most common class | its share (%) | uniform (%) |",
              "|---|---|---|---|---|---|"]
    for task, b in s["baselines"].items():
        lines.append(f"| {task} | {b['classes']} | {b['images']} | {b['most_common']} | "
                     f"{_pct(b['most_common_acc1'])} | {_pct(b['uniform_acc1'])} |")
    lines += ["", "## Runs", "", "| arm | text side | final loss per seed | train s per seed |", "|---|---|---|---|"]
    for a, v in doc["arms"].items():
        lines.append(f"| `{a}` | {v['text_side']} | " + ", ".join(f"{r['final_loss']:.4f}" for r in v["runs"])
                     + " | " + ", ".join(f"{r['train_seconds']:.0f}" for r in v["runs"]) + " |")
    lines += ["", f"Study config: `{s['train_config']}` (sha256 {s['train_config_sha256_12']}), overrides "
              f"{s['overrides'] or 'none'}, manifest `{s['manifest']}`, caches "
              + ", ".join(f"{k} `{v}`" for k, v in s["caches"].items()) + f", {s['threads'] or 'default'} torch "
              "threads. Per-run files: `bench/results/fidelity/<arm>-s<seed>.json`."]
    return "\n".join(lines) + "\n"


def readme_block(readme: str, block: str) -> str:
    """``readme`` with the text between the fidelity markers replaced by ``block``.

    Raises:
        ValueError: the README lacks the two markers (in order).
    """
    i, j = readme.find(BEGIN), readme.find(END)
    if i < 0 or j < i:
        raise ValueError(f"README has no {BEGIN} ... {END} block")
    return readme[: i + len(BEGIN)] + "\n" + block + readme[j:]


def plot(doc: dict[str, Any], path: Path) -> Path:
    """Grouped bars (mean, error bar = std over seeds) of the :data:`TABLE` metrics per arm, chance dashed.
    Written without timestamps so the same JSON gives the same PNG bytes with the same matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(doc["arms"])
    cols = [(c, k) for c, k in TABLE if all(k in doc["arms"][a]["metrics"] for a in arms)]
    fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cols)), 4.8))
    width = 0.8 / max(len(arms), 1)
    x = np.arange(len(cols))
    for i, a in enumerate(arms):
        m = doc["arms"][a]["metrics"]
        ax.bar(x + i * width - 0.4 + width / 2, [100 * m[k]["mean"] for _, k in cols], width,
               yerr=[100 * m[k]["std"] for _, k in cols], capsize=2, label=a)
    if arms:
        chance = doc["arms"][arms[0]]["chance"]
        for j, (_, k) in enumerate(cols):
            ax.hlines(100 * chance[k], j - 0.4, j + 0.4, colors="k", linestyles="dashed", linewidth=0.8)
    ax.set_xticks(x, [c for c, _ in cols], rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("% (dashed: uniform chance)")
    s = doc["study"]
    ax.set_title(f"emoji test split, {len(s['seeds'])} seeds, {s['steps']} steps x {s['batch_size']}: mean ± std")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def _json_text(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=1, ensure_ascii=False) + "\n"


def write_outputs(doc: dict[str, Any], out: Path, readme: Path | None, draw: bool = True) -> dict[str, Path]:
    """``fidelity.json``, ``fidelity.md``, ``fidelity.png`` (only with ``draw``) under ``out``, and the README
    block."""
    paths = {"json": out / "fidelity.json", "md": out / "fidelity.md", "png": out / "fidelity.png"}
    paths["json"].write_text(_json_text(doc), encoding="utf-8")
    paths["md"].write_text(render_markdown(doc), encoding="utf-8")
    if draw:
        plot(doc, paths["png"])
    if readme is not None:
        readme.write_text(readme_block(readme.read_text(encoding="utf-8"), render_summary(doc)), encoding="utf-8")
        paths["readme"] = readme
    return paths


def check(out: Path, readme: Path | None) -> list[str]:
    """Re-derive ``fidelity.json`` from the per-run files and re-render ``fidelity.md`` and the README block;
    return one line per file that differs from what is on disk, or that is missing (empty: all identical)."""
    need = [out / "fidelity" / "study.json", out / "fidelity.json", out / "fidelity.md"]
    missing = [p.relative_to(out).as_posix() for p in need if not p.is_file()]
    if missing:
        return [f"missing {', '.join(missing)} under {out.name}/ (run bench/fidelity.py first)"]
    problems = []
    try:
        doc = build_document(out)
    except (OSError, ValueError, KeyError) as e:
        return [f"the per-run files under {out.name}/fidelity/ do not build a document: {e!r}"]
    if (out / "fidelity.json").read_text(encoding="utf-8") != _json_text(doc):
        problems.append(f"{(out / 'fidelity.json').name} differs from what the per-run files give")
    on_disk = json.loads((out / "fidelity.json").read_text(encoding="utf-8"))
    if (out / "fidelity.md").read_text(encoding="utf-8") != render_markdown(on_disk):
        problems.append(f"{(out / 'fidelity.md').name} differs from the one rendered from fidelity.json")
    if readme is not None:
        text = readme.read_text(encoding="utf-8")
        if BEGIN not in text or END not in text:
            problems.append(f"{readme.name} has no {BEGIN} ... {END} block")
        elif readme_block(text, render_summary(on_disk)) != text:
            problems.append(f"{readme.name}'s fidelity block differs from the one rendered from fidelity.json")
    return problems

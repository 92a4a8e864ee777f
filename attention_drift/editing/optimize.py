"""The value optimisation shared by ROME, MEMIT and PMET, with a hook for extra loss terms.

One request is optimised on a batch of its rewrite prompt behind each context template
(``"{}"`` first: row 0 is the bare prompt), each followed by the new target, plus the
essence prompt ``"{subject} is a"`` as the last row. Trainable vectors ("deltas") are added
at the subject's last token of every row to the activations named by ``sites`` (all in one
block, ``layer``). The loss, as in the editors' code, is

    nll_factor * mean_rows(-sum_target_tokens log p / n_target_tokens)
    + kl_factor * KL(p_now || p_init) on the essence row at the subject's last token
    + weight_decay * sum_sites ||delta|| / ||init||^2
    + sum of the extra terms,

minimised with Adam; each step first checks ``loss < early_stop_loss`` (stop), the last
step only evaluates, and after each update every delta is projected back into the ball of
radius ``clamp_norm_factor * ||init||``, ``init`` being the site's value at row 0.

Speed: nothing below ``layer`` depends on the deltas, so one reference forward (no grad,
stopped before the final norm: no logits) records the residual entering block ``layer`` and
the keyword arguments HF passes to every later block (attention masks, rotary embeddings,
per layer so sliding-window layers keep theirs); each step then runs only blocks ``layer..`` through the bridge (their hooks fire)
and computes logits only at the target positions and at the essence row's subject token
(final norm and unembedding applied to those rows alone), instead of full-vocabulary
logits at every position. On rotary-attention models the steps also skip every position
before the subject's last token, which the deltas cannot reach: those enter attention as
keys / values cached from the reference pass (:class:`~attention_drift.core.runner.LayerRunner`, ``changes_from``), and the
suffixes run packed: rows grouped into packs of similar token counts (:func:`~attention_drift.core.runner.plan_packs`), each
pack one sequence, so a step costs about the sum of the suffix lengths (each ending at the last
position a loss reads), not the whole rows nor every row padded to the longest suffix (the
distract rows' are several times the rewriting rows'), and a token scores only its pack's cached
keys. Extra terms that read attention patterns get them
laid out as in a full forward.

Extra loss terms (:class:`ExtraLoss`, e.g. SADR) declare hook names; those at layers >=
``layer`` are captured live (differentiable) from each step's forward pass, those below come
from the reference pass (detached constants, they cannot change). Step 0 runs with all
deltas zero, so a term can record reference activations then.

Precision: the deltas, the optimiser, the losses (log-softmax of the read logits) and the
activations handed to extra terms are float32 whatever the model's dtype; a bfloat16 or
float16 model runs its blocks in its own dtype (the delta is added to its activation there).
"""

import contextlib
import contextvars
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from attention_drift.core import tokens
from attention_drift.core.data import Rewrite
from attention_drift.editing.config import EditError, RequestError
from attention_drift.core.models import n_layers
from attention_drift.core.tokens import Batch
from attention_drift.core.hooks import OUTPUT_LOG_PROBS, layer_of
from attention_drift.core.runner import LayerRunner, unembed_rows

OUTPUT = OUTPUT_LOG_PROBS


@dataclass(frozen=True)
class Objective:
    """Hyper-parameters of one value optimisation.

    Args:
        lr: Adam learning rate.
        steps: forward passes at most (the last one only evaluates).
        weight_decay: factor of ``sum ||delta|| / ||init||^2``.
        clamp_norm_factor: radius of each delta's ball, relative to ``||init||``.
        kl_factor: factor of the essence KL term.
        early_stop_loss: stop as soon as the total loss is below this.
        nll_factor: factor of the target NLL.
        argmax_schedule: PMET's rule: while the target is the argmax at every target
            position, the NLL factor is divided by 10 (for the next step) and the run stops
            if the KL term is <= 0.01.
    """

    lr: float
    steps: int
    weight_decay: float
    clamp_norm_factor: float
    kl_factor: float
    early_stop_loss: float = 0.05
    nll_factor: float = 1.0
    argmax_schedule: bool = False

    @classmethod
    def of(cls, config, **extra) -> "Objective":
        """The objective of an editor config with the usual value-optimisation fields
        (``lr``, ``steps``, ``weight_decay``, ``clamp_norm_factor``, ``kl_factor``,
        ``early_stop_loss``), plus ``extra`` fields."""
        return cls(lr=config.lr, steps=config.steps, weight_decay=config.weight_decay,
                   clamp_norm_factor=config.clamp_norm_factor, kl_factor=config.kl_factor,
                   early_stop_loss=config.early_stop_loss, **extra)


@dataclass(frozen=True)
class StepInfo:
    """What an extra loss term gets besides the activations; the same object every step.

    Rows ``[:n_rewriting]`` of ``batch`` are the context-prefixed rewrite prompts followed by
    the target, row ``n_rewriting`` is the essence prompt, and ``extra_rows`` are the prompts
    that terms asked for through ``extra_prompts`` (no loss of the editor's own on them). ``last_prompt_index`` is the
    position predicting the first target token (the essence row: its last token);
    ``subject_last_index`` the subject's last token, where the deltas are added.
    Activations of blocks ``>= start_layer`` are live, those below are constants. Live ones
    may be zeros where nothing of the editor's reads (see :class:`LayerRunner`): before the
    subject's last token, at a rewriting row's last token, after the essence row's subject.
    ``target_ids``: the first token of the new and of the true target after the prompt.
    """

    request: Rewrite
    batch: Batch
    n_rewriting: int
    last_prompt_index: Int[Tensor, " batch"]
    subject_last_index: Int[Tensor, " batch"]
    layer: int
    start_layer: int
    n_layers: int
    extra_rows: Int[Tensor, " extra"] = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    target_ids: tuple[int, int] = (-1, -1)


@runtime_checkable
class ExtraLoss(Protocol):
    """An extra term of the value loss, computed from the step's own forward pass.

    ``hook_names(info)`` is called once per optimisation and lists the hooks it reads
    (``blocks.{l}....`` names, e.g. ``blocks.{l}.attn.hook_pattern``); ``term(step, acts,
    info)`` returns a scalar tensor added to the loss; ``acts`` maps each requested name to
    the full activation ``[batch, ...]``. An optional ``record`` dict attribute is copied
    into the trace after the run. An optional ``extra_prompts(request) -> list[str]`` adds
    prompt rows to the batch (each containing the subject; the delta is injected at the last
    token of each occurrence, as the edited MLP would write it there; ``subject_last_index`` is
    the first's). An optional
    ``output_rows(info) -> Tensor`` names batch rows whose next-token log-probabilities at
    their last prompt position the term reads: ``acts[OUTPUT]`` is then ``[len(rows), d_vocab]``
    (float32, live), in that order.
    """

    name: str

    def hook_names(self, info: StepInfo) -> Sequence[str]: ...

    def __call__(self, step: int, acts: Mapping[str, Tensor], info: StepInfo) -> Tensor: ...


@dataclass
class OptimizationTrace:
    """Per-step record of one value optimisation (one request).

    ``init[site]`` / ``delta[site]``: the site's value before the edit and the optimised
    delta (the target value is their sum), at the subject's last token of the bare prompt.
    """

    request: Rewrite
    layer: int
    sites: tuple[str, ...]
    loss: list[float] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    weight_decay: list[float] = field(default_factory=list)
    target_prob: list[float] = field(default_factory=list)
    extra: dict[str, list[float]] = field(default_factory=dict)
    records: dict[str, dict] = field(default_factory=dict)
    stopped_early: bool = False
    seconds: float = 0.0
    init: dict[str, Tensor] = field(default_factory=dict, repr=False)
    delta: dict[str, Tensor] = field(default_factory=dict, repr=False)

    @property
    def steps_run(self) -> int:
        return len(self.loss)


@dataclass
class ValueSolution:
    """Result of :func:`optimize_values`.

    ``init[site]`` is the site's value at the subject's last token of row 0 (the bare
    prompt) before any change, ``delta[site]`` the optimised vector; ``reference[name]``
    holds the activations asked for in ``reference_names`` at the subject's last token of
    each rewriting row, from the delta-free reference pass.
    """

    init: dict[str, Tensor]
    delta: dict[str, Tensor]
    reference: dict[str, Tensor]
    trace: OptimizationTrace

    @property
    def target(self) -> dict[str, Tensor]:
        return {site: self.init[site] + self.delta[site] for site in self.init}


def hook_layer(name: str) -> int:
    try:
        return layer_of(name)
    except ValueError:
        raise EditError(f"hook {name!r} is not inside a block; extra losses can read 'blocks.L.*' hooks only") from None


def subject_last_index(model, text: str, subject: str, prefix_chars: int) -> int:
    """Token position of the last token of the subject occurrence that starts at or after
    character ``prefix_chars`` of ``text`` (the one the template put there)."""
    before, start = 0, text.find(subject)
    while start != -1 and start < prefix_chars:
        before += 1
        start = text.find(subject, start + 1)
    spans = tokens.subject_spans(model, text, subject)
    if start == -1 or len(spans) <= before:
        raise RequestError(
            f"subject {subject!r} does not occur in {text!r}; the prompt must contain the subject exactly "
            "as written (case and spacing included)"
        )
    return spans[before][1]


def template_rows(model, request: Rewrite, templates: Sequence[str]) -> tuple[list[str], list[int]]:
    """(prompts, subject last-token positions) of ``request.prompt`` behind each template."""
    prompts, positions = [], []
    for template in templates:
        prefix = template[: template.index("{}")]
        text = template.replace("{}", request.prompt, 1)
        prompts.append(text)
        positions.append(subject_last_index(model, text, request.subject, len(prefix) + request.prompt.find(request.subject)))
    return prompts, positions


def _concat(a: Batch, b: Batch, pad: int) -> Batch:
    width = max(a.input_ids.shape[1], b.input_ids.shape[1])

    def padded(t: Tensor, value: int) -> Tensor:
        return F.pad(t, (0, width - t.shape[1]), value=value)

    return Batch(
        torch.cat([padded(a.input_ids, pad), padded(b.input_ids, pad)]),
        torch.cat([padded(a.attention_mask, 0), padded(b.attention_mask, 0)]),
        torch.cat([a.prompt_lengths, b.prompt_lengths]),
        torch.cat([a.target_lengths, b.target_lengths]),
    )


def rewriting_batch(
    model, request: Rewrite, templates: Sequence[str], extra_prompts: Sequence[str] = ()
) -> tuple[Batch, int, Tensor]:
    """(batch, number of rewriting rows, subject last-token position per row) of a request:
    the rewriting rows, the essence row, then ``extra_prompts``."""
    prompts, positions = template_rows(model, request, templates)
    rewriting = tokens.batch_with_targets(model, prompts, [request.target_new] * len(prompts))
    essence_prompt = f"{request.subject} is a"
    essence = tokens.batch_prompts(model, [essence_prompt, *extra_prompts])
    for prompt in (essence_prompt, *extra_prompts):
        positions.append(subject_last_index(model, prompt, request.subject, 0))
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    return _concat(rewriting, essence, int(pad)), len(prompts), torch.tensor(positions)


def read_ends(batch: Batch, n_rewriting: int, subject_last: Int[Tensor, " batch"]) -> Int[Tensor, " batch"]:
    """One past the last position of each row of a :func:`rewriting_batch` that the value loss
    reads: a rewriting row's last target-predicting position (not its last token), the essence
    row's subject token (the KL term), an extra row's last prompt token."""
    return torch.cat([batch.lengths[:n_rewriting] - 1, subject_last[n_rewriting:n_rewriting + 1] + 1,
                      batch.lengths[n_rewriting + 1:]])


def term_prompts(extra_losses: Sequence[ExtraLoss], request: Rewrite, method: str) -> list[str]:
    """The prompts the extra terms give for ``request`` through their optional ``method(request)``
    (e.g. ``"extra_prompts"``), in term order; a term without it gives none."""
    prompts: list[str] = []
    for term in extra_losses:
        give = getattr(term, method, None)
        if give is not None:
            prompts += give(request)
    return prompts


_STEP_PROGRESS = contextvars.ContextVar("attention_drift_step_progress", default=False)


@contextlib.contextmanager
def step_progress(enabled: bool):
    """Inside the block, :func:`optimize_values` shows a bar over each value optimisation's steps
    (how :func:`~attention_drift.editing.apply_edit` passes its ``progress`` to any editor)."""
    token = _STEP_PROGRESS.set(enabled)
    try:
        yield
    finally:
        _STEP_PROGRESS.reset(token)


class RewritingSetup(NamedTuple):
    """What a value optimisation or a fine-tune of ``request`` builds before its first step
    (:func:`rewriting_setup`): the batch and its rows, the :class:`StepInfo` the extra terms
    read, the hook names they read split at the edited layer (``live``: changed by the edit,
    ``const``: before it), the rows whose output distribution a term reads, and ``also_at``: the
    (row, position) pairs of later occurrences of the subject in the extra rows, where an edited
    model's MLP fires too (the value optimisation adds the delta there as well)."""

    batch: Batch
    n_rewriting: int
    subject_last: Tensor
    rows: Tensor
    info: "StepInfo"
    live_names: dict[str, None]
    const_names: dict[str, None]
    output_rows: Tensor
    also_at: list[tuple[int, int]]


def rewriting_setup(model, request: Rewrite, templates: Sequence[str], layer: int,
                    extra_losses: Sequence[ExtraLoss] = ()) -> RewritingSetup:
    """The rewriting batch of ``request`` under ``templates`` (plus the rows the extra terms ask
    for), its :class:`StepInfo` for an edit of block ``layer``, and the hooks and output rows the
    extra terms read (an unknown hook is an :class:`EditError`)."""
    extra_prompts = term_prompts(extra_losses, request, "extra_prompts")
    batch, n_rw, subj = rewriting_batch(model, request, templates, extra_prompts)
    rows = torch.arange(len(batch))
    first_true = tokens.continuation_ids(model, request.prompt, request.target_true)[1][:1] or [-1]
    info = StepInfo(request, batch, n_rw, batch.last_prompt_index.clone(), subj, layer, layer, n_layers(model),
                    extra_rows=rows[n_rw + 1:],
                    target_ids=(int(batch.input_ids[0, batch.prompt_lengths[0]]), int(first_true[0])))
    live_names: dict[str, None] = {}
    const_names: dict[str, None] = {}
    for term in extra_losses:
        for name in term.hook_names(info):
            if name not in model.hook_dict:
                raise EditError(f"extra loss {term.name!r} asks for hook {name!r}, which the model does not have")
            (live_names if hook_layer(name) >= layer else const_names)[name] = None
    out_rows = {r for term in extra_losses if hasattr(term, "output_rows") for r in term.output_rows(info).tolist()}
    also_at = [(n_rw + 1 + i, last) for i, prompt in enumerate(extra_prompts)
               for _, last in tokens.subject_spans(model, prompt, request.subject)[1:]]
    return RewritingSetup(batch, n_rw, subj, rows, info, live_names, const_names,
                          torch.tensor(sorted(out_rows), dtype=torch.long), also_at)


def optimize_values(
    model,
    request: Rewrite,
    templates: Sequence[str],
    *,
    sites: Sequence[str],
    layer: int,
    objective: Objective,
    loss_layer: int | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
    reference_names: Sequence[str] = (),
    progress: bool | None = None,
) -> ValueSolution:
    """Optimise one delta per site (hook names in block ``layer``) for ``request``; see the module docstring.

    ``progress`` shows a bar over the optimisation steps (with the current loss); None: as the
    enclosing :func:`step_progress` block says (``apply_edit``'s ``progress``), else no bar.
    """
    return optimize_values_many(model, [request], templates, sites=sites, layer=layer, objective=objective,
                                loss_layer=loss_layer, extra_losses=extra_losses,
                                reference_names=reference_names, progress=progress)[0]


def _concat_all(batches: Sequence[Batch], pad: int) -> Batch:
    out = batches[0]
    for b in batches[1:]:
        out = _concat(out, b, pad)
    return out


def optimize_values_many(
    model,
    requests: Sequence[Rewrite],
    templates: Sequence[str],
    *,
    sites: Sequence[str],
    layer: int,
    objective: Objective,
    loss_layer: int | None = None,
    extra_losses: Sequence[ExtraLoss] = (),
    reference_names: Sequence[str] = (),
    progress: bool | None = None,
) -> list[ValueSolution]:
    """:func:`optimize_values` of each request, all requests' rows in one batch per step.

    Each request's loss reads only its own rows (attention never crosses rows) and its own
    deltas, so the gradient of the summed loss with respect to a request's deltas is that of
    its own loss, and Adam, elementwise, moves them as in a run of that request alone. A
    request whose loss falls below ``early_stop_loss`` (or, under ``argmax_schedule``, whose
    run would stop) is frozen from that step on: its loss leaves the sum and its deltas are
    put back after every later update. So each solution equals the request's own run up to
    float32 reordering, while a step runs one forward for all (larger matrix products, one
    pass of Python and hooks). Extra loss terms read one request's rows: with them, pass one
    request. Each trace's ``seconds`` is the batch's time divided by the number of requests.
    """
    start_time = time.perf_counter()
    total = n_layers(model)
    loss_layer = total - 1 if loss_layer is None else loss_layer
    n_req = len(requests)
    if templates[0] != "{}":
        raise EditError("the first context template must be '{}' (the bare prompt); init values are read there")
    if extra_losses and n_req != 1:
        raise EditError(f"extra loss terms read one request's rows; optimise the {n_req} requests one at a time")
    setups = [rewriting_setup(model, r, templates, layer, extra_losses) for r in requests]
    first = setups[0]  # extra terms come with one request only
    info, live_names, const_names, out_rows_t = first.info, first.live_names, first.const_names, first.output_rows
    sizes = [len(s.batch) for s in setups]
    offsets = [sum(sizes[:i]) for i in range(n_req)]
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    batch = _concat_all([s.batch for s in setups], int(pad))
    subj = torch.cat([s.subject_last for s in setups])
    rows = torch.arange(len(batch))
    request_of_row = torch.repeat_interleave(torch.arange(n_req), torch.tensor(sizes))
    first_rows = torch.tensor(offsets)
    essence_rows = first_rows + torch.tensor([s.n_rewriting for s in setups])
    suffix_ok = all(n.endswith("attn.hook_pattern") for n in live_names)
    runner = LayerRunner(model, batch, layer, list(sites) + list(reference_names) + list(const_names),
                         changes_from=subj if suffix_ok else None,
                         ends=torch.cat([read_ends(s.batch, s.n_rewriting, s.subject_last) for s in setups]))
    init = {s: runner.saved[s][first_rows, subj[first_rows]].to(torch.float32, copy=True) for s in sites}
    references = [{n: runner.saved[n][o + torch.arange(s.n_rewriting), subj[o:o + s.n_rewriting]].clone()
                   for n in reference_names} for o, s in zip(offsets, setups)]
    constants = {n: runner.saved[n].float() for n in const_names}

    # Target positions: the logits one position before each target token, per rewriting row.
    rw_rows, positions, target_ids, row_len, request_of_rw = [], [], [], [], []
    for i, (o, setup) in enumerate(zip(offsets, setups)):
        for j in range(setup.n_rewriting):
            p, t = int(batch.prompt_lengths[o + j]), int(batch.target_lengths[o + j])
            rw_rows += [o + j] * t
            positions += list(range(p - 1, p - 1 + t))
            target_ids += batch.input_ids[o + j, p:p + t].tolist()
            row_len.append(t)
            request_of_rw.append(i)
    rw_rows_t, target_t = torch.tensor(rw_rows), torch.tensor(target_ids)
    rw_index = torch.repeat_interleave(torch.arange(len(row_len)), torch.tensor(row_len))
    request_of_rw_t = torch.tensor(request_of_rw)
    request_of_target = request_of_rw_t[rw_index]
    target_at = runner.index(rw_rows_t, torch.tensor(positions))
    also = torch.tensor([(o + r, q) for o, s in zip(offsets, setups) for r, q in s.also_at],
                        dtype=torch.long).reshape(-1, 2)
    inject_rows = torch.cat([rows, also[:, 0]])
    subject_at = runner.index(inject_rows, torch.cat([subj, also[:, 1]]))
    request_of_inject = request_of_row[inject_rows]
    essence_at = runner.index(essence_rows, subj[essence_rows])
    output_at = runner.index(out_rows_t, info.last_prompt_index[out_rows_t])
    row_len_t = torch.tensor(row_len, dtype=torch.float32)
    n_rw_t = torch.tensor([s.n_rewriting for s in setups], dtype=torch.float32)

    d = {s: torch.zeros_like(init[s], requires_grad=True) for s in sites}
    opt = torch.optim.Adam(list(d.values()), lr=objective.lr)
    acts: dict[str, Tensor] = {}

    def inject(site):
        def fn(act, hook):
            act = act.clone()
            act[subject_at] = (act[subject_at] + d[site][request_of_inject]).to(act.dtype)
            return act
        return fn

    def capture(name):
        def fn(act, hook):
            acts[name] = runner.full_pattern(act).float()
        return fn

    traces = [OptimizationTrace(r, layer, tuple(sites), extra={t.name: [] for t in extra_losses}) for r in requests]
    kl_init = None
    nll_factor = [float(objective.nll_factor)] * n_req
    active = [True] * n_req
    frozen: dict[int, dict[str, Tensor]] = {}
    hooks = [(s, inject(s)) for s in sites] + [(n, capture(n)) for n in live_names]
    if progress is None:
        progress = _STEP_PROGRESS.get()
    bar = tqdm(total=objective.steps, desc="optimising value", unit="step", disable=not progress, leave=False)
    with model.hooks(fwd_hooks=hooks), bar:
        for step in range(objective.steps):
            opt.zero_grad()
            acts.clear()
            acts.update(constants)
            final, kept = runner.run(keep=(loss_layer,) if loss_layer < total - 1 else ())
            # one unembedding for every row read (its weights are read once per call)
            read = torch.cat([kept.get(loss_layer, final)[target_at], final[essence_at], final[output_at]])
            log_probs, kl_lp, output_lp = unembed_rows(model, read).float().log_softmax(-1).split(
                [len(target_t), n_req, len(out_rows_t)])
            if len(out_rows_t):
                acts[OUTPUT] = output_lp
            token_lp = log_probs.gather(-1, target_t[:, None])[:, 0]
            nll_rows = -torch.zeros(len(row_len)).index_add(0, rw_index, token_lp) / row_len_t
            nll = torch.zeros(n_req).index_add(0, request_of_rw_t, nll_rows) / n_rw_t
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = objective.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="none").sum(-1)
            wd = objective.weight_decay * sum(d[s].norm(dim=-1) / init[s].norm(dim=-1) ** 2 for s in sites)
            losses = torch.tensor(nll_factor) * nll + kl + wd
            extra_values = []
            for term in extra_losses:
                value = term(step, acts, info)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise EditError(f"extra loss {term.name!r} must return a scalar tensor, got {value!r}")
                losses = losses + value.reshape(())
                extra_values.append((term.name, value.item()))
            probs = torch.zeros(n_req).index_add(0, request_of_rw_t, torch.exp(-nll_rows.detach())) / n_rw_t
            misses = torch.zeros(n_req).index_add(0, request_of_target, (log_probs.argmax(-1) != target_t).float())
            values = {k: v.tolist() for k, v in (("loss", losses), ("nll", nll), ("kl", kl), ("wd", wd), ("p", probs))}
            for i in (i for i in range(n_req) if active[i]):
                trace = traces[i]
                trace.loss.append(values["loss"][i])
                trace.nll.append(values["nll"][i])
                trace.kl.append(values["kl"][i])
                trace.weight_decay.append(values["wd"][i])
                trace.target_prob.append(values["p"][i])
                for name, value in extra_values:
                    trace.extra[name].append(value)
                if trace.loss[-1] < objective.early_stop_loss:
                    trace.stopped_early, active[i] = True, False
                elif objective.argmax_schedule:
                    if misses[i] == 0:  # the target is the argmax at every target position
                        nll_factor[i] = 0.1 * objective.nll_factor
                        if trace.kl[-1] <= 0.01:
                            trace.stopped_early, active[i] = True, False
                    else:
                        nll_factor[i] = objective.nll_factor
                if not active[i]:
                    frozen[i] = {s: d[s][i].detach().clone() for s in sites}
            bar.update(1)
            bar.set_postfix(loss=f"{max(t.loss[-1] for t in traces):.3f}", refresh=False)
            if not any(active) or step == objective.steps - 1:
                break
            losses[torch.tensor(active)].sum().backward()
            opt.step()
            with torch.no_grad():
                for s in sites:
                    max_norm = objective.clamp_norm_factor * init[s].norm(dim=-1)
                    norm = d[s].norm(dim=-1)
                    d[s].mul_(torch.where(norm > max_norm, max_norm / norm, 1.0)[:, None])
                    for i, kept_delta in frozen.items():
                        d[s][i] = kept_delta[s]
    for term in extra_losses:
        record = getattr(term, "record", None)
        if isinstance(record, dict):
            traces[0].records[term.name] = dict(record)
    seconds = (time.perf_counter() - start_time) / n_req
    solutions = []
    for i, trace in enumerate(traces):
        trace.seconds = seconds
        trace.init = {s: init[s][i].clone() for s in sites}
        trace.delta = {s: d[s][i].detach().clone() for s in sites}
        solutions.append(ValueSolution(trace.init, trace.delta, references[i], trace))
    return solutions


@torch.no_grad()
def subject_activations(
    model, prompts: Sequence[str], positions: Sequence[int], names: Sequence[str]
) -> dict[str, Tensor]:
    """``{name: [len(prompts), d]}``: activations at the given position of each prompt.

    Runs only up to the highest block named (``stop_at_layer``).
    """
    batch = tokens.batch_prompts(model, list(prompts))
    saved: dict[str, Tensor] = {}

    def save(name):
        def fn(act, hook):
            saved[name] = act.detach()
        return fn

    stop = max(hook_layer(n) for n in names) + 1
    with model.hooks(fwd_hooks=[(n, save(n)) for n in dict.fromkeys(names)]):
        model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
              stop_at_layer=stop if stop < n_layers(model) else None)
    rows, pos = torch.arange(len(prompts)), torch.tensor(list(positions))
    return {n: saved[n][rows, pos].clone() for n in names}

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
keys / values cached from the reference pass (:class:`LayerRunner`, ``changes_from``), and the
suffixes run packed: rows grouped into packs of similar token counts (:func:`plan_packs`), each
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
from typing import Protocol, runtime_checkable

import einops
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from attention_drift import tokens
from attention_drift.data import Rewrite
from attention_drift.editing.config import EditError, RequestError
from attention_drift.models import n_layers
from attention_drift.tokens import Batch
from attention_drift.hooks import OUTPUT_LOG_PROBS, act_name, layer_of

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "output_attentions")
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
    prompt rows to the batch (each containing the subject; the delta is injected at its
    first occurrence's last token, as the edited MLP would write it there). An optional
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


class _FinalResidual(Exception):
    """Ends a reference pass at the final norm, carrying the residual that enters it."""

    def __init__(self, hidden: Tensor):
        super().__init__("reference pass stopped before the final norm")
        self.hidden = hidden


def _stop_before_final_norm(module, args, kwargs):
    raise _FinalResidual(args[0] if args else next(iter(kwargs.values())))


class _PrefixCache:
    """A stand-in for HF's key-value cache: puts each layer's constant keys / values (those of
    every row's positions before its suffix, from the reference pass) in front of the live
    ones, and stores nothing."""

    def __init__(self, kv: dict[int, tuple[Tensor, Tensor]]):
        self.kv = kv

    def update(self, key: Tensor, value: Tensor, layer_idx: int, *args, **kwargs) -> tuple[Tensor, Tensor]:
        k, v = self.kv[layer_idx]
        return torch.cat([k, key], -2), torch.cat([v, value], -2)


SCORE_ELEMENTWISE = 64


def token_and_key_costs(model) -> tuple[float, float]:
    """(cost of one token through a block's linear maps, cost of one query-key pair) in
    multiply-adds, the cost model of :func:`plan_packs`.

    A token costs the multiply-adds of its projections (queries, keys, values, output) and
    its MLP (three matrices when gated, else two). A query-key pair costs per head
    ``2 d_head`` multiply-adds (score and weighted value) plus the elementwise work on its
    score (mask, softmax, the pattern hook, and their backward), which on CPU weighs like
    :data:`SCORE_ELEMENTWISE` multiply-adds. Fitted on SmolLM2-135M (1 thread, ROME+SADR
    steps through blocks 5-29, forward and backward, 13 pack layouts of the published and
    the distract batches, residuals under 8 ms): 3.8 ms per token and 1.9 us per query-key
    pair, a ratio of 5.0e-4 = 9 heads * (128 + 70) / 3.54M multiply-adds.
    """
    cfg = model.cfg
    d, heads, d_head = cfg.d_model, cfg.n_heads, cfg.d_head
    kv_heads = getattr(cfg, "n_key_value_heads", None) or heads
    mlp = (3 if getattr(cfg, "gated_mlp", False) else 2) * d * (cfg.d_mlp or 4 * d)
    token = 2 * d * heads * d_head + 2 * d * kv_heads * d_head + mlp
    return float(token), float(heads * (2 * d_head + SCORE_ELEMENTWISE))


def plan_packs(suffix: Sequence[int], prefix: Sequence[int], token_cost: float, key_cost: float,
               groups: int | None = None) -> list[list[int]]:
    """Rows grouped into packs for :class:`LayerRunner`'s packed layout (rows with no suffix
    tokens left out): lists of row indices, each list one pack, in ascending order.

    A pack runs its rows' ``suffix`` tokens as one sequence attending to its rows' ``prefix``
    cached keys; packs are padded to the longest one, so ``G`` packs cost about
    ``G * Nmax * (token_cost + key_cost * (Pmax + Nmax))`` (``Nmax``, ``Pmax``: the most
    suffix tokens and cached keys of a pack). For each ``G`` (or the given ``groups``, at most
    the number of rows), rows in descending suffix length go one by one to the pack whose own
    cost stays lowest (balanced packs); the cheapest ``G`` wins. ``G = 1``: one sequence, no
    padding but every token scores every row's keys; ``G`` = rows: each row alone, padded to the
    longest suffix.
    """
    order = sorted((r for r in range(len(suffix)) if suffix[r] > 0), key=lambda r: (-suffix[r], -prefix[r], r))
    if not order:
        return []

    def pack_cost(n: int, p: int) -> float:
        return n * (token_cost + key_cost * (p + n))

    best: tuple[float, list[list[int]]] | None = None
    for g in ([min(groups, len(order))] if groups is not None else range(1, len(order) + 1)):
        packs: list[list[int]] = [[] for _ in range(g)]
        n, p = [0] * g, [0] * g
        for r in order:
            i = min(range(g), key=lambda i: (pack_cost(n[i] + suffix[r], p[i] + prefix[r]), i))
            packs[i].append(r)
            n[i] += suffix[r]
            p[i] += prefix[r]
        cost = g * max(n) * (token_cost + key_cost * (max(p) + max(n)))
        if best is None or cost < best[0]:
            best = (cost, sorted(sorted(pack) for pack in packs if pack))
    return best[1]


class LayerRunner:
    """Re-runs the bridge's blocks ``start..`` on the residual entering block ``start``.

    A reference forward (no grad; it stops at the final norm, so no logits are computed
    unless :attr:`logits` is read) records that residual and the arguments HF passes to
    each later block; :meth:`run` then calls the blocks itself, so hooks fire as usual, and
    returns the residual after ``upto``. Equal to the full
    forward (the tests compare the logits on tiny Llama and GPT-2 models).

    ``changes_from[row]``, when given, is the first position of each row that a change at
    block ``start`` can reach (the deltas go in at the subject's last token; causal attention
    keeps every earlier position as it was); ``ends[row]`` (optional) is one past the last
    position of the row that anything reads (causal attention: later positions cannot change
    it). Then, on rotary-attention bridges (Llama, SmolLM2, Gemma...), blocks run on those
    *suffix* positions only (``changes_from`` to ``ends``), packed: the rows are split into
    ``G`` packs (:func:`plan_packs`, from a cost model, or ``groups`` when given), each running
    the real suffix tokens of its rows as one sequence (batch ``G``, padded to the longest pack).
    A token attends to its own row's earlier positions, which enter attention as keys / values
    cached from the reference pass (its pack's rows' ones, padded to ``Pmax``
    over packs), and to its own row's earlier suffix tokens; the mask is gathered from HF's
    per-layer masks, so sliding windows hold. Activations are then ``[G, Nmax, ...]``
    (:meth:`index` maps (row, position) pairs to them) and attention patterns
    ``[G, head, Nmax, Pmax + Nmax]`` (:meth:`full_pattern` maps them back to ``[row, head, T, T]``).
    ``G = 1`` is one sequence of all suffixes; ``G`` = rows is every row alone, padded to
    the longest suffix. A check at construction compares the packed run with the reference
    (in bfloat16 / float16, to a few rounding units per position); on a mismatch (or another
    attention type) the runner falls back to full rows. ``layout`` says which: ``"packed"``
    or ``"full"``; ``groups`` is ``G`` (full rows: the batch size).
    """

    def __init__(self, model, batch: Batch, start: int, reference_names: Sequence[str] = (),
                 changes_from: Tensor | None = None, groups: int | None = None, ends: Tensor | None = None):
        if groups is not None and groups < 1:
            raise EditError(f"groups must be a positive number of packs or None (chosen by cost), got {groups}")
        self.model, self.start, self.total = model, start, n_layers(model)
        calls: dict[int, tuple[tuple, dict]] = {}
        saved: dict[str, Tensor] = {}
        want_packed = changes_from is not None and self._packing_supported(model, start)
        kv_names = ([n for l in range(start, self.total) for n in (act_name("rot_k", l), act_name("v", l))]
                    if want_packed else [])
        final_name = act_name("resid_post", self.total - 1)

        def pre_hook(layer):
            def fn(module, args, kwargs):
                calls[layer] = (args, kwargs)
            return fn

        def save(name):
            def fn(act, hook):
                saved[name] = act.detach()
            return fn

        handles = [self.model.blocks[l].register_forward_pre_hook(pre_hook(l), with_kwargs=True)
                   for l in range(start, self.total)]
        ln_final = getattr(model, "ln_final", None)
        if isinstance(ln_final, torch.nn.Module):
            handles.append(ln_final.register_forward_pre_hook(_stop_before_final_norm, with_kwargs=True))
        names = dict.fromkeys([*reference_names, *kv_names, *([final_name] if want_packed else [])])
        self._final: Tensor | None = None
        self._logits: Tensor | None = None
        try:
            with torch.no_grad(), model.hooks(fwd_hooks=[(n, save(n)) for n in names]):
                try:
                    self._logits = model(batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except _FinalResidual as stop:
                    self._final = stop.hidden.detach()
        finally:
            for handle in handles:
                handle.remove()
        self.saved = {n: saved[n] for n in reference_names}
        args, kwargs = calls[start]
        self.resid = (args[0] if args else kwargs["hidden_states"]).detach()
        self.calls = {}
        for layer, (args, kwargs) in calls.items():
            kwargs = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
            self.calls[layer] = (args[1:] if args else (), kwargs)
        self.layout, self.groups = "full", len(batch.input_ids)
        if want_packed:
            self._build_packed(batch, changes_from.to(self.resid.device), saved, groups,
                               None if ends is None else ends.to(self.resid.device))
        if self.layout == "packed":
            with torch.no_grad():
                final, _ = self.run()
                final = final[self._tok_pack, self._tok_slot].float()
                reference = saved[final_name][self._rows, self._pos].float()
                if self.resid.dtype in (torch.float32, torch.float64):
                    ok = torch.allclose(final, reference, atol=1e-4, rtol=1e-3)
                else:  # bfloat16 / float16: rounding differs with the batch layout; bugs give O(1) errors
                    error = (final - reference).norm(dim=-1) / reference.norm(dim=-1).clamp_min(1e-6)
                    ok = bool(error.max() <= 8 * torch.finfo(self.resid.dtype).eps)
            if not ok:
                self.layout, self.groups = "full", len(batch.input_ids)

    @property
    def logits(self) -> Tensor:
        """Full-vocabulary logits ``[batch, pos, d_vocab]`` of the reference pass, computed on
        first use: the pass itself stops at the final norm (no step reads these)."""
        if self._logits is None:
            with torch.no_grad():
                b, T, d = self._final.shape
                self._logits = unembed_rows(self.model, self._final.reshape(b * T, d)).reshape(b, T, -1)
        return self._logits

    @staticmethod
    def _packing_supported(model, start: int) -> bool:
        attn = model.blocks[start].attn
        return (type(attn).__name__ == "PositionEmbeddingsAttentionBridge" and hasattr(attn, "hook_rot_k")
                and all(act_name(kind, l) in model.hook_dict for l in range(start, n_layers(model))
                        for kind in ("rot_k", "v")))

    def _build_packed(self, batch: Batch, changes_from: Tensor, saved: dict[str, Tensor],
                      groups: int | None, ends: Tensor | None) -> None:
        """Sets up the packed layout (``layout = "packed"``), or leaves ``layout`` at ``"full"``
        when a block's arguments are not the kind it knows how to pack."""
        b, T = batch.input_ids.shape
        device = self.resid.device
        real = batch.attention_mask.to(device).bool()
        position = torch.arange(T, device=device)[None]
        before = position < changes_from.long()[:, None]
        is_query, is_cached = real & ~before, real & before
        if ends is not None:
            is_query &= position < ends.long()[:, None]
        if not bool(is_query.any()):
            return
        packs = plan_packs(is_query.sum(1).tolist(), is_cached.sum(1).tolist(),
                           *token_and_key_costs(self.model), groups=groups)
        pack_of = torch.full((b,), -1, dtype=torch.long, device=device)
        slot = torch.full((b, T), -1, dtype=torch.long, device=device)  # query slot in its pack
        cached_slot = torch.full((b, T), -1, dtype=torch.long, device=device)
        n_max = p_max = 0
        for g, pack in enumerate(packs):
            n = p = 0
            for r in pack:
                pack_of[r] = g
                for mask, where, offset in ((is_query, slot, n), (is_cached, cached_slot, p)):
                    at = mask[r].nonzero()[:, 0]
                    where[r, at] = offset + torch.arange(len(at), device=device)
                n, p = n + int(is_query[r].sum()), p + int(is_cached[r].sum())
            n_max, p_max = max(n_max, n), max(p_max, p)
        G, K = len(packs), p_max + n_max
        rows, pos = is_query.nonzero(as_tuple=True)
        tok_pack, tok_slot = pack_of[rows], slot[rows, pos]
        key_rows, key_pos = is_cached.nonzero(as_tuple=True)
        key_pack, key_slot = pack_of[key_rows], cached_slot[key_rows, key_pos]
        q_row = torch.full((G, n_max), -1, dtype=torch.long, device=device)
        q_pos = torch.zeros((G, n_max), dtype=torch.long, device=device)
        q_row[tok_pack, tok_slot], q_pos[tok_pack, tok_slot] = rows, pos
        k_row = torch.full((G, K), -1, dtype=torch.long, device=device)
        k_pos = torch.zeros((G, K), dtype=torch.long, device=device)
        k_row[key_pack, key_slot], k_pos[key_pack, key_slot] = key_rows, key_pos
        k_row[:, p_max:], k_pos[:, p_max:] = q_row, q_pos
        q_any = q_row.clamp(min=0)
        own_row = (k_row[:, None, :] == q_row[:, :, None]) & (q_row >= 0)[:, :, None]
        # a padding query attends to itself alone: its values stay finite and no real query sees it
        pad_self = (q_row < 0)[:, :, None] & (torch.arange(K, device=device)[None] == p_max
                                                + torch.arange(n_max, device=device)[:, None])[None]
        packed_calls = {}
        for layer, (args, kwargs) in self.calls.items():
            mask = kwargs.get("attention_mask")
            if (args or mask is None or mask.dim() != 4 or not mask.is_floating_point()
                    or "position_embeddings" not in kwargs):
                return
            cos, sin = kwargs["position_embeddings"]
            if cos.dim() != 3:
                return
            per_key = mask.expand(b, -1, -1, -1)[q_any[:, :, None], :, q_pos[:, :, None], k_pos[:, None, :]]
            per_key = einops.rearrange(per_key, "g q k h -> g h q k")
            outside = torch.full_like(per_key, torch.finfo(mask.dtype).min).masked_fill(pad_self[:, None], 0)
            packed_mask = torch.where(own_row[:, None], per_key, outside)
            gather = lambda t: t.expand(b, *t.shape[1:])[q_any, q_pos]  # noqa: E731
            attn = self.model.blocks[layer].attn
            k = saved[act_name("rot_k", layer)]  # hooks show [batch, pos, kv head, d_head]
            v = saved[act_name("v", layer)].reshape(*k.shape[:3], -1)
            cached = []
            for t in (k, v):
                c = t.new_zeros((G, p_max, *t.shape[2:]))
                c[key_pack, key_slot] = t[key_rows, key_pos]
                cached.append(einops.rearrange(c, "g key head d -> g head key d"))
            # HF 5 hands its own cache to attention as ``cache``, which the bridge does not read;
            # ``layer_past`` reaches the bridge's attention through the decoder layer's **kwargs.
            new = {**kwargs, "attention_mask": packed_mask,
                   "position_embeddings": (gather(cos), gather(sin)),
                   "layer_past": _PrefixCache({int(getattr(attn, "_layer_idx", layer)): tuple(cached)})}
            if kwargs.get("position_ids") is not None:
                new["position_ids"] = gather(kwargs["position_ids"])
            packed_calls[layer] = new
        packed_resid = self.resid.new_zeros((G, n_max, self.resid.shape[-1]))
        packed_resid[tok_pack, tok_slot] = self.resid[rows, pos]
        self.packed_calls, self.packed_resid = packed_calls, packed_resid
        self._rows, self._pos, self._tok_pack, self._tok_slot = rows, pos, tok_pack, tok_slot
        self._pack_of, self._slot = pack_of, slot
        self._key = torch.where(is_cached, cached_slot, torch.where(is_query, p_max + slot, -1))
        self.layout, self.groups = "packed", G

    def index(self, rows: Int[Tensor, " n"], positions: Int[Tensor, " n"]) -> tuple[Int[Tensor, " n"], Int[Tensor, " n"]]:
        """(row index, position index) of (row, absolute position) pairs in the runner's
        activations (read them as ``act[row_index, position_index]``): the pairs themselves
        with full rows, ``(pack, slot in the pack)`` in the packed layout."""
        if self.layout == "full":
            return rows, positions
        rows, positions = rows.to(self._slot.device), positions.to(self._slot.device)
        slot = self._slot[rows, positions]
        if bool((slot < 0).any()):
            bad = [(int(r), int(q)) for r, q, f in zip(rows, positions, slot) if f < 0]
            raise EditError(f"(row, position) pairs {bad} are not run by the packed layer runner: only real "
                            "tokens from each row's changes_from position on are")
        return self._pack_of[rows], slot

    def full_pattern(self, pattern: Tensor) -> Tensor:
        """An attention pattern of the runner's layout as ``[row, head, T, T]``: a packed
        ``[G, head, Nmax, Pmax + Nmax]`` one gets zeros at queries before each row's suffix and
        at padding."""
        if self.layout == "full":
            return pattern
        query, key = self._slot, self._key
        out = pattern[self._pack_of.clamp(min=0)[:, None, None], :, query.clamp(min=0)[:, :, None],
                      key.clamp(min=0)[:, None, :]]
        seen = (query >= 0)[:, :, None] & (key >= 0)[:, None, :]
        return einops.rearrange(out, "row q k head -> row head q k") * seen[:, None]

    def run(self, upto: int | None = None, keep: Sequence[int] = ()) -> tuple[Tensor, dict[int, Tensor]]:
        """(residual after block ``upto`` (default: the last), {layer: residual after it} for ``keep``)."""
        upto = self.total - 1 if upto is None else upto
        packed = self.layout == "packed"
        hidden, kept = (self.packed_resid if packed else self.resid), {}
        for layer in range(self.start, upto + 1):
            if packed:
                out = self.model.blocks[layer](hidden, **self.packed_calls[layer])
                hidden = out[0] if isinstance(out, tuple) else out
            else:
                hidden = self.block(layer, hidden)
            if layer in keep:
                kept[layer] = hidden
        return hidden, kept

    def block(self, layer: int, hidden: Float[Tensor, "batch pos d_model"]) -> Float[Tensor, "batch pos d_model"]:
        """Block ``layer`` (at or after ``start``) run on ``hidden`` with the reference pass's
        arguments, full rows. ``hidden`` may hold ``n`` copies of the reference rows (copy-major,
        as ``Tensor.repeat`` lays them out: row ``i * rows + r`` is a copy of row ``r``); every
        argument with the reference batch's size is then repeated to match."""
        args, kwargs = self.calls[layer]
        rows = self.resid.shape[0]
        copies = hidden.shape[0] // rows
        if copies * rows != hidden.shape[0]:
            raise EditError(f"a block input of {hidden.shape[0]} rows is not copies of the {rows} reference rows")
        if copies > 1:
            args = _repeat_rows(args, rows, copies)
            kwargs = {k: _repeat_rows(v, rows, copies) for k, v in kwargs.items()}
        if "hidden_states" in kwargs:
            out = self.model.blocks[layer](*args, **{**kwargs, "hidden_states": hidden})
        else:
            out = self.model.blocks[layer](hidden, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _repeat_rows(value, rows: int, copies: int):
    """A block argument with every tensor of ``rows`` rows (a mask, position ids, rotary
    tables; 2+ dimensions) repeated ``copies`` times along the batch; others as they are."""
    if isinstance(value, Tensor) and value.dim() >= 2 and value.shape[0] == rows:
        return value.repeat(copies, *([1] * (value.dim() - 1)))
    if isinstance(value, tuple):
        return tuple(_repeat_rows(v, rows, copies) for v in value)
    return value


def unembed_rows(model, hidden: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_vocab"]:
    """Logits of residual vectors: final norm then unembedding (with Gemma's soft cap)."""
    logits = model.unembed(model.ln_final(hidden[None]))[0]
    cap = getattr(model.original_model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _none(request: Rewrite) -> tuple[str, ...]:
    return ()


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
    start_time = time.perf_counter()
    total = n_layers(model)
    loss_layer = total - 1 if loss_layer is None else loss_layer
    if templates[0] != "{}":
        raise EditError("the first context template must be '{}' (the bare prompt); init values are read there")
    extra_prompts = [p for term in extra_losses for p in (getattr(term, "extra_prompts", None) or _none)(request)]
    batch, n_rw, subj = rewriting_batch(model, request, templates, extra_prompts)
    rows = torch.arange(len(batch))
    first_true = tokens.continuation_ids(model, request.prompt, request.target_true)[1][:1] or [-1]
    info = StepInfo(request, batch, n_rw, batch.last_prompt_index.clone(), subj, layer, layer, total,
                    extra_rows=rows[n_rw + 1:],
                    target_ids=(int(batch.input_ids[0, batch.prompt_lengths[0]]), int(first_true[0])))

    live_names: dict[str, None] = {}
    const_names: dict[str, None] = {}
    for term in extra_losses:
        for name in term.hook_names(info):
            if name not in model.hook_dict:
                raise EditError(f"extra loss {term.name!r} asks for hook {name!r}, which the model does not have")
            (live_names if hook_layer(name) >= layer else const_names)[name] = None

    out_rows = [r for term in extra_losses if hasattr(term, "output_rows") for r in term.output_rows(info).tolist()]
    out_rows_t = torch.tensor(sorted(set(out_rows)), dtype=torch.long)
    suffix_ok = all(n.endswith("attn.hook_pattern") for n in live_names)
    runner = LayerRunner(model, batch, layer, list(sites) + list(reference_names) + list(const_names),
                         changes_from=subj if suffix_ok else None, ends=read_ends(batch, n_rw, subj))
    init = {s: runner.saved[s][0, subj[0]].to(torch.float32, copy=True) for s in sites}
    reference = {n: runner.saved[n][rows[:n_rw], subj[:n_rw]].clone() for n in reference_names}
    constants = {n: runner.saved[n].float() for n in const_names}

    # Target positions: the logits one position before each target token.
    rw_rows, positions, target_ids, row_len = [], [], [], []
    for i in range(n_rw):
        p, t = int(batch.prompt_lengths[i]), int(batch.target_lengths[i])
        rw_rows += [i] * t
        positions += list(range(p - 1, p - 1 + t))
        target_ids += batch.input_ids[i, p:p + t].tolist()
        row_len.append(t)
    rw_rows_t, target_t = torch.tensor(rw_rows), torch.tensor(target_ids)
    target_at = runner.index(rw_rows_t, torch.tensor(positions))
    subject_at = runner.index(rows, subj)
    essence_at = runner.index(rows[n_rw:n_rw + 1], subj[n_rw:n_rw + 1])
    output_at = runner.index(out_rows_t, info.last_prompt_index[out_rows_t])
    row_len_t = torch.tensor(row_len, dtype=torch.float32)

    d = {s: torch.zeros_like(init[s], requires_grad=True) for s in sites}
    opt = torch.optim.Adam(list(d.values()), lr=objective.lr)
    acts: dict[str, Tensor] = {}

    def inject(site):
        def fn(act, hook):
            act = act.clone()
            act[subject_at] = (act[subject_at] + d[site]).to(act.dtype)
            return act
        return fn

    def capture(name):
        def fn(act, hook):
            acts[name] = runner.full_pattern(act).float()
        return fn

    trace = OptimizationTrace(request, layer, tuple(sites), extra={t.name: [] for t in extra_losses})
    kl_init = None
    nll_factor = objective.nll_factor
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
                [len(target_t), 1, len(out_rows_t)])
            if len(out_rows_t):
                acts[OUTPUT] = output_lp
            token_lp = log_probs.gather(-1, target_t[:, None])[:, 0]
            nll_each = -torch.zeros(n_rw).index_add(0, rw_rows_t, token_lp) / row_len_t
            nll = nll_each.mean()
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            kl = objective.kl_factor * F.kl_div(kl_init, kl_lp, log_target=True, reduction="batchmean")
            wd = objective.weight_decay * sum(d[s].norm() / init[s].norm() ** 2 for s in sites)
            loss = nll_factor * nll + kl + wd
            for term in extra_losses:
                value = term(step, acts, info)
                if not isinstance(value, Tensor) or value.numel() != 1:
                    raise EditError(f"extra loss {term.name!r} must return a scalar tensor, got {value!r}")
                loss = loss + value.reshape(())
                trace.extra[term.name].append(value.item())
            trace.loss.append(loss.item())
            trace.nll.append(nll.item())
            trace.kl.append(kl.item())
            trace.weight_decay.append(wd.item())
            trace.target_prob.append(torch.exp(-nll_each).mean().item())
            bar.update(1)
            bar.set_postfix(loss=f"{trace.loss[-1]:.3f}", refresh=False)
            if trace.loss[-1] < objective.early_stop_loss:
                trace.stopped_early = True
                break
            if objective.argmax_schedule:
                if bool((log_probs.argmax(-1) == target_t).all()):
                    nll_factor = 0.1 * objective.nll_factor
                    if trace.kl[-1] <= 0.01:
                        trace.stopped_early = True
                        break
                else:
                    nll_factor = objective.nll_factor
            if step == objective.steps - 1:
                break
            loss.backward()
            opt.step()
            with torch.no_grad():
                for s in sites:
                    max_norm = objective.clamp_norm_factor * init[s].norm()
                    if d[s].norm() > max_norm:
                        d[s].mul_(max_norm / d[s].norm())
    for term in extra_losses:
        record = getattr(term, "record", None)
        if isinstance(record, dict):
            trace.records[term.name] = dict(record)
    trace.seconds = time.perf_counter() - start_time
    trace.init = init
    trace.delta = {s: d[s].detach().clone() for s in sites}
    return ValueSolution(init, trace.delta, reference, trace)


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

"""The layer runner: re-runs a bridge's blocks from a cached residual, the executor that editing
(the value optimisation's steps) and patching (patched forwards) share.

:class:`LayerRunner` does one reference forward (no grad; it stops before the final norm)
that records the residual entering block ``start`` and the arguments HF passes to every later
block, then calls the blocks itself, so hooks fire as usual. On rotary-attention models it can
skip every position a change cannot reach, running the remaining suffixes packed
(:func:`plan_packs`, costed by :func:`token_and_key_costs`) against the cached keys / values of
the prefixes. :func:`unembed_rows` applies the final norm and unembedding to chosen rows only.
"""

from collections.abc import Sequence

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor

from attention_drift.core.errors import AttentionDriftError
from attention_drift.core.hooks import act_name
from attention_drift.core.models import n_layers
from attention_drift.core.tokens import Batch

_DROP_KWARGS = ("cache", "past_key_values", "past_key_value", "output_attentions")


class RunnerError(AttentionDriftError):
    """A layer-runner call that cannot be run as asked (pack count, rows, positions)."""


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
            raise RunnerError(f"groups must be a positive number of packs or None (chosen by cost), got {groups}")
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
            raise RunnerError(f"(row, position) pairs {bad} are not run by the packed layer runner: only real "
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
            raise RunnerError(f"a block input of {hidden.shape[0]} rows is not copies of the {rows} reference rows")
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

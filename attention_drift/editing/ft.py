"""FT-L: constrained fine-tuning of one MLP output projection (the ROME paper's baseline).

What it does, per request (following the authors' ``baselines/ft/ft_main.py`` with their
``hparams/FT/*_constr.json``):

* the loss is the negative log-likelihood of the new target after the request's own prompt
  (no context templates: their FT trains on the bare prompt only), plus any extra terms
  (SADR, ...);
* Adam (``lr``, the authors' 5e-4) updates the weights of ``blocks.L.mlp.out`` for at most
  ``steps`` (25) forward / backward passes; a pass whose loss is already below
  ``early_stop_loss`` (1e-2) stops the run without updating;
* after every update each weight is clamped into ``[W0 - norm_constraint, W0 +
  norm_constraint]``, an L-infinity ball around the weights before the edit;
* the parameter is put back and the whole change ``W - W0`` is handed to ``apply`` as one
  update, so that :class:`~attention_drift.editing.EditResult`'s undo and replay and the edit
  cache stay bitwise.

The optimised tensor is the change ``D = W - W0`` itself (float32, starting at zero), written
into the parameter as ``W0 + D`` before each forward; the gradient with respect to the weight
is the gradient with respect to ``D``. This is the authors' Adam on ``W`` with the clamp
(``clamp(W, W0 - eps, W0 + eps) - W0 = clamp(D, -eps, eps)``; ``tests/test_ft.py`` runs their
loop beside it: equal up to float32 rounding), and the update handed to ``apply`` is ``D``:
``max |D| <= norm_constraint`` holds exactly, and the edited weights are ``W0 + D`` as every step
computed them (inside the ball up to one rounding of that sum).

Extra loss terms (:class:`~attention_drift.editing.optimize.ExtraLoss`, e.g. SADR / SADR+)
plug in as in the value optimisation: the batch is the same layout (the prompt followed by
the target, the essence row ``"{subject} is a"``, then the rows the terms ask for through
``extra_prompts``; see :class:`~attention_drift.editing.optimize.StepInfo`), and every step
re-runs blocks ``L..`` with the current weights through the bridge, so the hooked attention
patterns the terms read are those of the fine-tuned model (blocks below ``L`` cannot change:
their activations come from one reference pass, as constants). Step 0 runs with ``D = 0``,
the unedited weights, where SADR records its reference patterns, so its loss is zero there.

Where this differs from the authors' code, and why:

* Multi-token targets are scored with teacher forcing (the mean over the target's tokens of
  ``-log p`` at the position before each), as the value optimisation and the efficacy score
  do. The authors' FT gathers every target token's log-probability from the distribution at
  the last prompt position, which scores a multi-token target as a bag of first tokens.
* Several requests are fine-tuned one after the other (as our ROME applies them), each from the
  weights holding the previous ones and each handing its own change to ``apply``; the
  constraint keeps the whole edit inside one ball around the weights before the edit (later
  requests get the room the earlier ones left). The authors fine-tune on all requests at once
  (batches of 128); one at a time gives every extra term (SADR) the per-request rows and
  reference patterns it is built for.
* Only the weight is tuned, not the projection's bias: the authors select parameters by
  substring (``transformer.h.0.mlp.c_proj``), which also trains the bias on GPT-2 / GPT-J; our
  editors write the MLP output weights only (Llama-style models have no bias there).
* Their ``weight_decay`` and ``kl_factor`` fields are 0 in every file and have no effect on the
  constrained runs; they are left out.
* A bfloat16 / float16 model: ``D`` and Adam stay float32 and the weights run in the model's
  dtype, so the constraint holds for ``D`` exactly and for the stored weights up to their
  rounding.
* The steps run blocks ``L..`` only (a :class:`~attention_drift.core.runner.LayerRunner` from
  the edited layer) and unembed only the positions the losses read; the result is that of a
  full forward.
"""

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from attention_drift.core.data import Rewrite
from attention_drift.core.hooks import OUTPUT_LOG_PROBS, mlp_weight_name
from attention_drift.core.models import mlp_out_weight
from attention_drift.core.runner import LayerRunner, unembed_rows
from attention_drift.editing.config import EditError, FTConfig
from attention_drift.editing.optimize import (
    _STEP_PROGRESS,
    ExtraLoss,
    OptimizationTrace,
    rewriting_setup,
)


@dataclass(frozen=True)
class Prepared:
    """FT needs nothing before the edit (no statistics, no context templates)."""


def prepare(model, config: FTConfig, *, progress: bool = True) -> Prepared:
    return Prepared()


def execute(
    model,
    requests: Sequence[Rewrite],
    config: FTConfig,
    prepared: Prepared,
    apply: Callable[[str, Tensor], None],
    extra_losses: Sequence[ExtraLoss] = (),
) -> list[OptimizationTrace]:
    """Fine-tune ``config.layer``'s MLP output weights for each request in turn and hand each
    request's change to ``apply``; one trace per request."""
    param = mlp_out_weight(model, config.layer)
    name = mlp_weight_name(config.layer)
    total = torch.zeros(param.shape, dtype=torch.float32, device=param.device)  # change of the edit so far
    traces = []
    was = param.requires_grad
    try:
        param.requires_grad_(True)
        for request in requests:
            change, trace = fine_tune(model, request, config, param, total, extra_losses)
            apply(name, change.to(param.dtype))
            total += change
            traces.append(trace)
    finally:
        param.grad = None
        param.requires_grad_(was)
    return traces


def fine_tune(
    model, request: Rewrite, config: FTConfig, param: torch.nn.Parameter, previous: Tensor,
    extra_losses: Sequence[ExtraLoss] = (),
) -> tuple[Tensor, OptimizationTrace]:
    """The change ``D`` (float32, the parameter's layout) that fine-tuning makes for ``request``,
    and its trace; the parameter holds its weights before the call again on return.

    ``previous`` is the change earlier requests of the same edit made (the parameter holds it);
    ``D`` is kept inside ``[-eps - previous, eps - previous]``, so that the edit as a whole stays in
    the L-infinity ball of radius ``config.norm_constraint`` around the weights before the edit.
    """
    start_time = time.perf_counter()
    layer = config.layer
    batch, n_rw, subj, rows, info, live_names, const_names, out_rows_t, _ = rewriting_setup(
        model, request, ["{}"], layer, extra_losses)
    # full rows: a weight change reaches every position from block ``layer`` on
    runner = LayerRunner(model, batch, layer, list(const_names))
    constants = {n: runner.saved[n].float() for n in const_names}

    # the logits one position before each target token
    p, t = int(batch.prompt_lengths[0]), int(batch.target_lengths[0])
    target_rows = torch.zeros(t, dtype=torch.long)
    target_pos = torch.arange(p - 1, p - 1 + t)
    target_ids = batch.input_ids[0, p:p + t]

    base = param.detach().clone()
    base32 = base.float()
    eps = config.norm_constraint
    low, high = (None, None) if eps is None else (-eps - previous, eps - previous)
    d = torch.zeros(param.shape, dtype=torch.float32, device=param.device, requires_grad=True)
    opt = torch.optim.Adam([d], lr=config.lr)
    acts: dict[str, Tensor] = {}

    def capture(name):
        def fn(act, hook):
            acts[name] = runner.full_pattern(act).float() if name.endswith("attn.hook_pattern") else act.float()
        return fn

    trace = OptimizationTrace(request, layer, (mlp_weight_name(layer),), extra={t.name: [] for t in extra_losses})
    bar = tqdm(total=config.steps, desc="fine-tuning", unit="step", disable=not _STEP_PROGRESS.get(), leave=False)
    try:
        with model.hooks(fwd_hooks=[(n, capture(n)) for n in live_names]), bar:
            for step in range(config.steps):
                with torch.no_grad():
                    param.copy_((base32 + d).to(param.dtype))
                param.grad = None
                acts.clear()
                acts.update(constants)
                final, _ = runner.run()
                read = torch.cat([final[target_rows, target_pos], final[out_rows_t, info.last_prompt_index[out_rows_t]]])
                log_probs, output_lp = unembed_rows(model, read).float().log_softmax(-1).split([t, len(out_rows_t)])
                if len(out_rows_t):
                    acts[OUTPUT_LOG_PROBS] = output_lp
                nll = -log_probs.gather(-1, target_ids[:, None]).mean()
                loss = nll
                for term in extra_losses:
                    value = term(step, acts, info)
                    if not isinstance(value, Tensor) or value.numel() != 1:
                        raise EditError(f"extra loss {term.name!r} must return a scalar tensor, got {value!r}")
                    loss = loss + value.reshape(())
                    trace.extra[term.name].append(value.item())
                trace.loss.append(loss.item())
                trace.nll.append(nll.item())
                trace.target_prob.append(torch.exp(-nll).item())
                bar.update(1)
                bar.set_postfix(loss=f"{trace.loss[-1]:.3f}", refresh=False)
                if trace.loss[-1] < config.early_stop_loss:
                    trace.stopped_early = True
                    break
                loss.backward()
                d.grad = param.grad.float()
                opt.step()
                if eps is not None:
                    with torch.no_grad():
                        d.clamp_(min=low, max=high)
    finally:
        with torch.no_grad():
            param.copy_(base)
        param.grad = None
    for term in extra_losses:
        record = getattr(term, "record", None)
        if isinstance(record, dict):
            trace.records[term.name] = dict(record)
    trace.seconds = time.perf_counter() - start_time
    return d.detach().clone(), trace

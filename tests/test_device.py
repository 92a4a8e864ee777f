"""Device cleanliness of drift, patching and the case study, checked without a GPU.

With the model on a GPU, every tensor the toolkit makes for it (token batches, masks, indices,
NaN fills) must be made on the model's device, or the first op that mixes it with an activation
fails. On the CPU that mistake is invisible, so these tests make it visible: inside
``torch.device("meta")`` every tensor created WITHOUT an explicit device is a meta tensor, which
cannot be mixed with the model's CPU tensors nor read back (both raise), and a meta index into a
CPU tensor silently reads garbage (caught because every number must equal a plain run's,
exactly). A forward pre-hook on the wrapped Hugging Face model (every forward of the bridge reaches it)
also checks that every tensor handed to the model is on its device.
What this does not show: kernels that behave differently on CUDA, and device-to-host copies
that are legal but slow.
"""

import contextlib
import json

import pytest
import torch

from attention_drift.measure.case_study import case_study
from attention_drift.core.data import distract_prompt, load_example
from attention_drift.measure.drift import collect_attention_rows, drift_record
from attention_drift.runs.analysis import dataset_drift
from attention_drift.core.models import mlp_out_weight, model_device
from attention_drift.measure.patching import _PATTERN_SUPPORT
from attention_drift.measure.patch_record import patch_record

from handmade_edit import push_subject  # noqa: E402

RECORDS = load_example()
EIFFEL, OBAMA = RECORDS[0], RECORDS[3]


class ForeignDefaultDevice:
    """Context: the default device is "meta" and the model refuses inputs off its own device."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def _check(self, module, args, kwargs):
        device = model_device(self.model)
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device != device:
                raise AssertionError(f"a {tuple(value.shape)} tensor on {value.device} was handed to the model "
                                     f"on {device}")
        self.calls += 1

    def __enter__(self):
        _PATTERN_SUPPORT.pop(self.model, None)  # probe again, inside the trap
        self.handle = self.model.original_model.register_forward_pre_hook(self._check, with_kwargs=True)
        self.device = torch.device("meta")
        self.device.__enter__()
        return self

    def __exit__(self, *exc):
        self.device.__exit__(*exc)
        self.handle.remove()


def replayed_edit(model, record):
    """The hand-made edit of ``record`` precomputed outside the trap (its own tensors are not ours):
    a context that adds the stored weight change and restores the weight."""
    weight = mlp_out_weight(model, 0)
    original = weight.detach().clone()
    with push_subject(model, record.rewrite):
        delta = weight.detach() - original

    @contextlib.contextmanager
    def edit():
        saved = weight.detach().clone()
        with torch.no_grad():
            weight.add_(delta)
        try:
            yield
        finally:
            with torch.no_grad():
                weight.copy_(saved)

    return edit


@pytest.fixture(params=["tiny_llama", "tiny_gpt2"])
def model(request):
    return request.getfixturevalue(request.param)


def _same(a, b) -> None:
    """Equal JSON, but for the edit's wall time."""
    def untimed(x):
        if isinstance(x, dict):
            return {k: untimed(v) for k, v in x.items() if k != "edit_seconds"}
        return [untimed(v) for v in x] if isinstance(x, list) else x

    assert json.dumps(untimed(a)) == json.dumps(untimed(b))


def test_the_trap_catches_a_tensor_made_without_a_device(tiny_llama):
    ids = torch.tensor([[1, 2, 3]], device="cpu")
    with ForeignDefaultDevice(tiny_llama) as trap:
        tiny_llama(ids)
        assert trap.calls == 1
        with pytest.raises(AssertionError, match="on meta was handed to the model"):
            tiny_llama(torch.tensor([[1, 2, 3]]))
        with pytest.raises(RuntimeError):
            torch.arange(3) + ids[0]


def test_drift_is_device_clean(model):
    edits = {r.case_id: replayed_edit(model, r) for r in (EIFFEL, OBAMA)}
    factory = lambda r: edits[r.case_id]()  # noqa: E731
    plain = [drift_record(model, r, factory, capture_heads=2).to_line(capture=True) for r in (EIFFEL, OBAMA)]
    report = dataset_drift(model, [EIFFEL, OBAMA], factory).to_dict()
    prompts = [distract_prompt(EIFFEL.rewrite, p) for p in EIFFEL.neighborhood.prompts]
    rows = collect_attention_rows(model, prompts, query=[3, 4, 5]).rows
    with ForeignDefaultDevice(model) as trap:
        _same([drift_record(model, r, factory, capture_heads=2).to_line(capture=True) for r in (EIFFEL, OBAMA)], plain)
        _same(dataset_drift(model, [EIFFEL, OBAMA], factory).to_dict(), report)
        assert torch.equal(collect_attention_rows(model, prompts, query=[3, 4, 5]).rows, rows)
    assert trap.calls >= 9


def test_patching_is_device_clean(model):
    edit = replayed_edit(model, EIFFEL)
    options = {"k": 2, "window": 2, "sweep_prompts": 1, "contamination_prompts": 1, "contamination_window": 2}
    plain = patch_record(model, EIFFEL, lambda r: edit(), **options).to_line()
    with ForeignDefaultDevice(model) as trap:
        _same(patch_record(model, EIFFEL, lambda r: edit(), **options).to_line(), plain)
    assert trap.calls > 0


def test_case_study_is_device_clean(model):
    edit = replayed_edit(model, EIFFEL)
    prompt = distract_prompt(EIFFEL.rewrite, EIFFEL.neighborhood.prompts[0])
    plain = case_study(model, EIFFEL.rewrite, prompt, "Paris", edit_fn=edit).to_json()
    with ForeignDefaultDevice(model) as trap:
        _same(case_study(model, EIFFEL.rewrite, prompt, "Paris", edit_fn=edit).to_json(), plain)
    assert trap.calls > 0

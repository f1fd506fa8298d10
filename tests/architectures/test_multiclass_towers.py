"""Every registered architecture with a multi-class task: K logits per row for it, ``(B,)`` for the other tasks,
softmax predictions, gradients into its tower; entire-space architectures refuse it, naming themselves and the
task."""

from __future__ import annotations

import pytest
import torch

from mtl_lightning import Task, registry
from tests.architectures.test_architectures import TASKS_FOR, arguments, feature_batch

GENRE = Task("genre", kind="multiclass", num_classes=5)
# the architectures that multiply their tasks' probabilities along a funnel: their tasks must be binary
FUNNELS = {"esmm", "escm", "dcmt", "aitm"}


@pytest.mark.parametrize("name", registry.names())
def test_every_architecture_gives_k_logits_to_a_multiclass_task(name):
    torch.manual_seed(0)
    kwargs = arguments(name)
    if name in FUNNELS:
        tasks = list(TASKS_FOR[name])
        tasks[1] = Task(tasks[1].name, kind="multiclass", num_classes=5, label=tasks[1].label)
        with pytest.raises(ValueError) as info:
            registry.create(name, **{**kwargs, "tasks": tasks})
        message = str(info.value)
        assert message.startswith(f"{registry.get(name).__name__}: ")
        assert f"'{tasks[1].name}': 'multiclass'" in message and "binary" in message
        return
    model = registry.create(name, **{**kwargs, "tasks": [Task("click"), GENRE, Task("dwell", kind="regression")]})
    assert model.output_width("genre") == 5 and model.output_width("click") == 1
    outputs = model(feature_batch(16))
    assert outputs["genre"].shape == (16, 5) and outputs["click"].shape == (16,) and outputs["dwell"].shape == (16,)
    assert torch.isfinite(outputs["genre"]).all()
    predictions = model.predictions(outputs)
    torch.testing.assert_close(predictions["genre"], torch.softmax(outputs["genre"], dim=-1))
    torch.testing.assert_close(predictions["click"], torch.sigmoid(outputs["click"]))
    # a loss on one class's logit alone reaches the shared parameters
    outputs["genre"][:, 2].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.shared_parameters())

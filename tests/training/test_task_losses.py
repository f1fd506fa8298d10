"""Task(loss=...): focal, label smoothing, Huber and JRC against their formulas, gradients, masking, sample weights,
configs, and a training step with every weighting strategy."""

from __future__ import annotations

import math

import pytest
import torch

from datamodules.synthetic import synthetic_features
from mtl_lightning import MultiTaskLightningModule, Task
from mtl_lightning.architectures import MMoE
from mtl_lightning.features import DenseFeature, SequenceFeature
from mtl_lightning.losses import jrc_loss, masked_loss
from mtl_lightning.weighting import STRATEGIES

NAN = float("nan")


def sigmoid(z: float) -> float:
    return 1 / (1 + math.exp(-z))


def loss_and_grad(logits: list[float], labels: list[float], kind: str = "binary", **kwargs):
    """The loss and its gradient; masked_loss computes in float32, hence the 1e-6 tolerances."""
    prediction = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    loss = masked_loss(prediction, torch.tensor(labels, dtype=torch.float64), kind, ignore_label=-1, **kwargs)
    loss.backward()
    return loss.item(), prediction.grad.tolist()


def test_focal_loss_value_and_gradient_by_hand():
    # z = 0.5 positive, z = 1.0 negative, one ignored row (-1) and one NaN row; gamma 2, alpha 0.25
    loss, grad = loss_and_grad([0.5, 1.0, 3.0, -2.0], [1, 0, -1, NAN], loss="focal",
                               options={"gamma": 2.0, "alpha": 0.25})
    p, q = sigmoid(0.5), sigmoid(1.0)
    positive = -0.25 * (1 - p) ** 2 * math.log(p)  # -alpha (1 - p_t)^gamma log p_t, p_t = p
    negative = -0.75 * q ** 2 * math.log(1 - q)  # p_t = 1 - q, alpha_t = 1 - alpha
    assert positive == pytest.approx(0.016893, abs=1e-6) and negative == pytest.approx(0.526401, abs=1e-6)
    assert loss == pytest.approx((positive + negative) / 2, abs=1e-6)
    # dL/dz = alpha (1-p)^g [g p log p - (1 - p)] for a positive, (1-alpha) p^g [p - g (1-p) log(1-p)] for a negative
    d_positive = 0.25 * (1 - p) ** 2 * (2 * p * math.log(p) - (1 - p))
    d_negative = 0.75 * q ** 2 * (q - 2 * (1 - q) * math.log(1 - q))
    assert grad[0] == pytest.approx(d_positive / 2, abs=1e-6) and grad[1] == pytest.approx(d_negative / 2, abs=1e-6)
    assert grad[2] == 0 and grad[3] == 0
    # gamma 0 and alpha None is BCE; extreme logits stay finite
    assert loss_and_grad([0.5, 1.0], [1, 0], loss="focal", options={"gamma": 0.0, "alpha": None})[0] == pytest.approx(
        (-math.log(p) - math.log(1 - q)) / 2, abs=1e-6)
    value, grad = loss_and_grad([200.0, -200.0, 200.0], [0, 1, 1], loss="focal", options={"gamma": 0.5})
    assert math.isfinite(value) and all(math.isfinite(g) for g in grad)


def test_label_smoothing_trains_on_the_smoothed_target():
    # eps = 0.2: a positive's target is 0.9, a negative's 0.1
    loss, grad = loss_and_grad([0.5, -1.0, 2.0], [1, 0, -1], options={"label_smoothing": 0.2})
    p, q = sigmoid(0.5), sigmoid(-1.0)
    expected = (-(0.9 * math.log(p) + 0.1 * math.log(1 - p)) - (0.1 * math.log(q) + 0.9 * math.log(1 - q))) / 2
    assert loss == pytest.approx(expected, abs=1e-6)
    assert grad == pytest.approx([(p - 0.9) / 2, (q - 0.1) / 2, 0.0], abs=1e-6)
    # focal with smoothing: alpha_t and (1 - p_t) read the smoothed target
    y = 0.9
    focal = (0.25 * y + 0.75 * (1 - y)) * (y * (1 - p) + (1 - y) * p) ** 2 * -(y * math.log(p) + (1 - y) * math.log(1 - p))
    assert loss_and_grad([0.5], [1], loss="focal", options={"label_smoothing": 0.2})[0] == pytest.approx(focal, abs=1e-6)


def test_huber_and_mse_by_hand():
    # residuals 0.5 and -3 (delta 1), one NaN row
    loss, grad = loss_and_grad([1.5, -1.0, 7.0], [1.0, 2.0, NAN], "regression", loss="huber")
    assert loss == pytest.approx((0.5 * 0.5 ** 2 + 1.0 * (3 - 0.5)) / 2, abs=1e-6)
    assert grad == pytest.approx([0.5 / 2, -1.0 / 2, 0.0], abs=1e-6)
    loss, grad = loss_and_grad([1.5, -1.0], [1.0, 2.0], "regression", loss="huber", options={"delta": 4.0})
    assert loss == pytest.approx((0.125 + 4.5) / 2, abs=1e-6) and grad == pytest.approx([0.25, -1.5], abs=1e-6)
    loss, grad = loss_and_grad([1.5, -1.0], [1.0, 2.0], "regression", loss="mse")
    assert loss == pytest.approx((0.25 + 9) / 2, abs=1e-6) and grad == pytest.approx([0.5, -3.0], abs=1e-6)


def jrc_two_logit_reference(z: torch.Tensor, y: torch.Tensor, session: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's form with two logits per row (z1, z0) = (z/2, -z/2) and a session-by-session mask, written
    independently of the library's segment reductions."""
    logits = torch.stack([-z / 2, z / 2], dim=1)  # [:, 0] no click, [:, 1] click
    calibration = torch.nn.functional.cross_entropy(logits, y.long(), reduction="none")
    ranking = []
    for i in range(len(z)):
        label = int(y[i])
        competitors = (session == session[i]) & ((y != y[i]) | (torch.arange(len(z)) == i))
        column = logits[competitors, label]
        own = logits[i, label]
        ranking.append(-(own - torch.logsumexp(column, 0)))
    return alpha * calibration + (1 - alpha) * torch.stack(ranking)


def test_jrc_by_hand_with_sessions_ignored_rows_and_weights():
    # session 7: a positive (z=1) and two negatives (-0.5, 0.2); session 3: a positive (0.4) whose only other row
    # is ignored, so its ranking term is 0
    z = [1.0, -0.5, 0.2, 0.4, -1.0]
    y = [1, 0, 0, 1, -1]
    groups = torch.tensor([7, 7, 7, 3, 3])
    loss, grad = loss_and_grad(z, y, loss="jrc", groups=groups)
    bce = [-math.log(sigmoid(1.0)), -math.log(1 - sigmoid(-0.5)), -math.log(1 - sigmoid(0.2)), -math.log(sigmoid(0.4))]
    rank = [-math.log(math.exp(0.5) / (math.exp(0.5) + math.exp(-0.25) + math.exp(0.1))),  # z1 = z/2 vs negatives
            -math.log(math.exp(0.25) / (math.exp(0.25) + math.exp(-0.5))),  # z0 = -z/2 vs the positive
            -math.log(math.exp(-0.1) / (math.exp(-0.1) + math.exp(-0.5))),
            0.0]
    assert loss == pytest.approx(sum(0.5 * b + 0.5 * r for b, r in zip(bce, rank)) / 4, abs=1e-6)
    assert grad[4] == 0
    # gradient against the paper's two-logit form, and finite differences
    zt = torch.tensor(z[:4], dtype=torch.float64, requires_grad=True)
    reference = jrc_two_logit_reference(zt, torch.tensor(y[:4], dtype=torch.float64), groups[:4], 0.5).mean()
    reference.backward()
    assert reference.item() == pytest.approx(loss, abs=1e-6)
    assert grad[:4] == pytest.approx(zt.grad.tolist(), abs=1e-6)
    target = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64)  # the ignored row's label zeroed
    valid = torch.tensor([True, True, True, True, False])
    assert torch.autograd.gradcheck(lambda v: jrc_loss(v, target, valid, groups, alpha=0.3),
                                    (torch.tensor(z, dtype=torch.float64, requires_grad=True),))
    # sample weights weigh each row's whole JRC term
    w = torch.tensor([2.0, 1.0, 0.0, 1.0, 5.0], dtype=torch.float64)
    weighted = masked_loss(torch.tensor(z, dtype=torch.float64), torch.tensor(y, dtype=torch.float64), "binary",
                           weights=w, loss="jrc", groups=groups)
    terms = [0.5 * b + 0.5 * r for b, r in zip(bce, rank)]
    assert weighted.item() == pytest.approx((2 * terms[0] + terms[1] + terms[3]) / 4, abs=1e-6)


def test_jrc_on_a_random_batch_matches_the_two_logit_form_and_one_session_per_batch():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(40, generator=generator, dtype=torch.float64) * 3
    y = (torch.rand(40, generator=generator) < 0.3).double()
    groups = torch.randint(0, 6, (40,), generator=generator)
    ours = masked_loss(z, y, "binary", loss="jrc", options={"alpha": 0.2}, groups=groups)
    assert ours.item() == pytest.approx(jrc_two_logit_reference(z, y, groups, 0.2).mean().item(), abs=1e-5)
    whole = masked_loss(z, y, "binary", loss="jrc", options={"session": "batch"})
    assert whole.item() == pytest.approx(jrc_two_logit_reference(z, y, torch.zeros(40), 0.5).mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="no 'group' tensor"):
        masked_loss(z, y, "binary", loss="jrc")


def test_task_loss_options_are_checked_and_plain_data():
    task = Task("ctr", loss="focal", loss_options={"gamma": 1.0, "alpha": None})
    assert Task.from_config(task.to_config()) == task and task.to_config()["loss_options"] == {"gamma": 1.0,
                                                                                                "alpha": None}
    assert hash(task) == hash(Task.from_config(task.to_config()))
    assert Task("ctr").loss == "bce" and Task("dwell", kind="regression").loss == "mse"
    # a task written before losses were named loads with its kind's default
    assert Task.from_config({"name": "dwell", "kind": "regression"}).loss == "mse"
    with pytest.raises(ValueError, match="Task 'ctr': loss 'huber' is not a loss of binary tasks"):
        Task("ctr", loss="huber")
    with pytest.raises(ValueError, match="Task 'ctr': loss 'focal' has no option 'gama'"):
        Task("ctr", loss="focal", loss_options={"gama": 2})
    with pytest.raises(ValueError, match="option 'gamma' must be a number >= 0"):
        Task("ctr", loss="focal", loss_options={"gamma": -1})
    with pytest.raises(ValueError, match="option 'label_smoothing' must be a number in"):
        Task("ctr", loss_options={"label_smoothing": 1.0})
    with pytest.raises(ValueError, match="option 'delta' must be a number > 0"):
        Task("d", kind="regression", loss="huber", loss_options={"delta": 0})
    with pytest.raises(TypeError, match="loss_options must be a dict"):
        Task("ctr", loss_options=[("gamma", 2)])


def _batch(features, size: int = 16) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    batch = {}
    for f in features:
        if isinstance(f, SequenceFeature):
            batch[f.name] = torch.randint(0, f.vocab_size, (size, f.max_len), generator=generator)
        elif isinstance(f, DenseFeature):
            batch[f.name] = torch.randn(size, generator=generator)
        else:
            batch[f.name] = torch.randint(0, f.vocab_size, (size,), generator=generator)
    return batch


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_weighting_strategy_trains_with_focal_jrc_and_huber(name):
    """One training step per strategy with a focal click task (label smoothing), a JRC conversion task ranked
    within the batch's groups, and a Huber dwell task, with ignored rows and sample weights: finite gradients
    reach the shared parameters and the step lowers nothing to NaN."""
    tasks = [Task("click", loss="focal", loss_options={"gamma": 2.0, "label_smoothing": 0.1}),
             Task("conversion", loss="jrc", loss_options={"alpha": 0.5}),
             Task("dwell", kind="regression", loss="huber", loss_options={"delta": 0.5})]
    features = synthetic_features(4)
    torch.manual_seed(0)
    model = MMoE(features, tasks, num_experts=2, expert_hidden=(8,), tower_hidden=(4,))
    module = MultiTaskLightningModule(model, weighting=name)
    labels = {"click": torch.tensor([0.0, 1.0] * 8), "conversion": torch.tensor([1.0, -1.0, 0.0, NAN] * 4),
              "dwell": torch.randn(16, generator=torch.Generator().manual_seed(1))}
    weights = {"click": torch.linspace(0.5, 2.0, 16)}
    groups = torch.arange(16) // 4
    losses = module.compute_losses(model(_batch(features)), labels, weights, groups)
    assert all(torch.isfinite(loss) and loss > 0 for loss in losses.values())
    module.weighting([losses[t.name] for t in module.tasks]).backward()
    grads = [p.grad for p in model.shared_parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads), name
    assert sum(g.abs().sum() for g in grads) > 0, name


def test_jrc_reads_the_data_modules_group_column_in_a_fit(synthetic_paths, quiet_trainer):
    from datamodules import ParquetDataModule
    from datamodules.synthetic import synthetic_features

    tasks = [Task("click", loss="jrc"), Task("conversion", loss="focal"),
             Task("dwell", kind="regression", loss="huber")]

    def fit(**data) -> MultiTaskLightningModule:
        dm = ParquetDataModule(train=synthetic_paths["train"], val=synthetic_paths["val"], tasks=tasks,
                               features=synthetic_features(), batch_size=2048, **data)
        torch.manual_seed(0)
        module = MultiTaskLightningModule(MMoE(dm.features, tasks, num_experts=2, expert_hidden=(8,),
                                               tower_hidden=(4,)))
        trainer = quiet_trainer(max_steps=3, limit_val_batches=0, log_every_n_steps=1)
        trainer.fit(module, datamodule=dm)
        return trainer

    trainer = fit(group="user_id")  # the batches' group ids reach the loss (without them it raises, below)
    assert all(math.isfinite(trainer.callback_metrics[f"train/{t.name}/loss"].item()) for t in tasks)
    with pytest.raises(ValueError, match="no 'group' tensor"):
        fit()

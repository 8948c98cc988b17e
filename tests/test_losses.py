"""Every loss term against numbers worked out by hand with plain ``math`` (not by re-running the torch formula)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from losses import (
    BNStatHooks,
    WeightedSum,
    adversarial_loss,
    bn_stat_distance,
    boundary_targets,
    class_activation_map,
    class_prior_loss,
    kd_kl_loss,
    msarc_loss,
    spatial_attention,
)

# ---------------------------------------------------------------- plain-Python helpers (the "by hand" side)


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    exps = [math.exp(v / tau) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q))


def cross_entropy(row: list[float], label: int) -> float:
    return -math.log(softmax(row)[label])


def l2(v: list[float]) -> float:
    return math.sqrt(sum(x * x for x in v))


def normalized(v: list[float]) -> list[float]:
    n = l2(v)
    return [x / n for x in v]


def squared_distance(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b))


def bn_term(channels: list[list[float]], running_mean: list[float], running_var: list[float]) -> float:
    """‖μ − μ_run‖ + ‖σ² − σ²_run‖ from the per-channel lists of values."""
    means = [sum(c) / len(c) for c in channels]
    variances = [sum((x - m) ** 2 for x in c) / len(c) for c, m in zip(channels, means)]
    return l2([m - r for m, r in zip(means, running_mean)]) + l2([v - r for v, r in zip(variances, running_var)])


def pool_2x2_blocks(grid: list[list[float]]) -> list[float]:
    """Average 2×2 blocks of a 4×4 grid, row-major flattened: the adaptive pool from 4×4 to 2×2."""
    return [
        sum(grid[2 * i + di][2 * j + dj] for di in (0, 1) for dj in (0, 1)) / 4 for i in range(2) for j in range(2)
    ]


def bn_layer(running_mean: list[float], running_var: list[float]) -> nn.BatchNorm2d:
    layer = nn.BatchNorm2d(len(running_mean))
    layer.running_mean.copy_(torch.tensor(running_mean))
    layer.running_var.copy_(torch.tensor(running_var))
    return layer.eval()


def all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---------------------------------------------------------------- BN statistics (DeepInversion)

# 2 samples × 2 channels × 1×2: channel 0 holds 1, 3, 2, 6 (mean 3, var 3.5), channel 1 0, -2, 4, 2 (mean 1, var 5)
BN_INPUT = torch.tensor([[[[1.0, 3.0]], [[0.0, -2.0]]], [[[2.0, 6.0]], [[4.0, 2.0]]]])  # (2, 2, 1, 2)
BN_CHANNELS = [[1.0, 3.0, 2.0, 6.0], [0.0, -2.0, 4.0, 2.0]]
RUN_MEAN, RUN_VAR = [0.5, -1.0], [2.0, 0.5]


def test_bn_loss_single_layer_hand_value():
    # ‖(3, 1) − (0.5, −1)‖ + ‖(3.5, 5) − (2, 0.5)‖ = √10.25 + √22.5
    expected = math.sqrt(10.25) + math.sqrt(22.5)
    assert bn_term(BN_CHANNELS, RUN_MEAN, RUN_VAR) == pytest.approx(expected)
    model = nn.Sequential(bn_layer(RUN_MEAN, RUN_VAR))
    with BNStatHooks(model) as bn:
        model(BN_INPUT)
        assert bn.has_batchnorm
        assert len(bn.per_layer()) == 1
        assert bn.loss().item() == pytest.approx(expected, rel=1e-6)
    assert bn_stat_distance(model, BN_INPUT) == pytest.approx(expected, rel=1e-6)


def test_bn_loss_first_multiplier_and_second_layer():
    # first BN is the identity (mean 0, var 1 − eps, affine 1/0), so the second sees the same input
    first = bn_layer([0.0, 0.0], [1.0 - 1e-5, 1.0 - 1e-5])
    second = bn_layer(RUN_MEAN, RUN_VAR)
    model = nn.Sequential(first, second)
    term_first = bn_term(BN_CHANNELS, [0.0, 0.0], [1.0 - 1e-5, 1.0 - 1e-5])
    term_second = bn_term(BN_CHANNELS, RUN_MEAN, RUN_VAR)
    with BNStatHooks(model, first_multiplier=3.0) as bn:
        model(BN_INPUT)
        per_layer = [t.item() for t in bn.per_layer()]
        assert per_layer == pytest.approx([term_first, term_second], rel=1e-5)
        assert bn.loss().item() == pytest.approx(3.0 * term_first + term_second, rel=1e-5)


def test_bn_terms_record_only_latest_forward():
    model = nn.Sequential(bn_layer(RUN_MEAN, RUN_VAR))
    with BNStatHooks(model) as bn:
        model(torch.zeros(2, 2, 1, 2))
        model(BN_INPUT)
        assert len(bn.per_layer()) == 1
        assert bn.loss().item() == pytest.approx(math.sqrt(10.25) + math.sqrt(22.5), rel=1e-6)


def test_bn_hooks_removed_after_context_and_by_remove():
    model = nn.Sequential(nn.Conv2d(2, 2, 1), bn_layer(RUN_MEAN, RUN_VAR), nn.ReLU(), bn_layer(RUN_MEAN, RUN_VAR))
    with BNStatHooks(model):
        assert all_hooks(model) == 3  # the clearing pre-hook on the model + one per BN layer
    assert all_hooks(model) == 0
    hooks = BNStatHooks(model)
    hooks.remove()
    hooks.remove()  # idempotent
    assert all_hooks(model) == 0


def test_bn_gradient_reaches_input():
    model = nn.Sequential(bn_layer(RUN_MEAN, RUN_VAR))
    x = BN_INPUT.clone().requires_grad_()
    with BNStatHooks(model) as bn:
        model(x)
        bn.loss().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_bn_1d_inputs():
    layer = nn.BatchNorm1d(2).eval()
    layer.running_mean.copy_(torch.tensor(RUN_MEAN))
    layer.running_var.copy_(torch.tensor(RUN_VAR))
    expected = math.sqrt(10.25) + math.sqrt(22.5)
    flat = torch.tensor([[1.0, 0.0], [3.0, -2.0], [2.0, 4.0], [6.0, 2.0]])  # (N=4, C=2): same channel values
    with BNStatHooks(layer) as bn:
        layer(flat)
        assert bn.loss().item() == pytest.approx(expected, rel=1e-6)
        layer(BN_INPUT[:, :, 0, :])  # (N=2, C=2, L=2)
        assert bn.loss().item() == pytest.approx(expected, rel=1e-6)


def test_bn_model_without_batchnorm():
    model = nn.Linear(3, 2)
    with BNStatHooks(model) as bn:
        model(torch.ones(2, 3))
        assert not bn.has_batchnorm
        assert bn.per_layer() == []
        assert bn.loss().item() == 0.0


def test_bn_stat_distance_restores_train_mode():
    model = nn.Sequential(bn_layer(RUN_MEAN, RUN_VAR)).train()
    before = model[0].running_mean.clone()
    bn_stat_distance(model, BN_INPUT)
    assert model.training
    assert torch.equal(model[0].running_mean, before)


# ---------------------------------------------------------------- class prior

LOGITS = [[1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]


def test_class_prior_int_labels():
    expected = (cross_entropy(LOGITS[0], 1) + cross_entropy(LOGITS[1], 2)) / 2
    assert class_prior_loss(torch.tensor(LOGITS), torch.tensor([1, 2])).item() == pytest.approx(expected, rel=1e-6)


def test_class_prior_soft_labels_are_lambda_weighted_ces():
    # CutMix pairs: sample 0 is 0.7·class 1 + 0.3·class 0, sample 1 is 0.4·class 1 + 0.6·class 2
    weights = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.4, 0.6]])
    expected = (
        0.7 * cross_entropy(LOGITS[0], 1)
        + 0.3 * cross_entropy(LOGITS[0], 0)
        + 0.4 * cross_entropy(LOGITS[1], 1)
        + 0.6 * cross_entropy(LOGITS[1], 2)
    ) / 2
    assert class_prior_loss(torch.tensor(LOGITS), weights).item() == pytest.approx(expected, rel=1e-6)


def test_class_prior_boundary_moves_a_share_onto_the_nearest_other_class():
    # sample 0 (class 1): of the other classes 0 (logit 1) and 2 (logit 0), class 0 is nearest;
    # sample 1 (class 2): of 0 (0.5) and 1 (−1), class 0 again
    expected = (0.7 * cross_entropy(LOGITS[0], 1) + 0.3 * cross_entropy(LOGITS[0], 0)
                + 0.7 * cross_entropy(LOGITS[1], 2) + 0.3 * cross_entropy(LOGITS[1], 0)) / 2
    loss = class_prior_loss(torch.tensor(LOGITS), torch.tensor([1, 2]), boundary=0.3)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # CutMix targets: the nearest class is sought outside both labelled classes (class 2 for sample 0, 0 for 1)
    weights = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.4, 0.6]])
    targets = boundary_targets(weights, torch.tensor(LOGITS), 0.2)
    assert torch.allclose(targets, torch.tensor([[0.24, 0.56, 0.2], [0.2, 0.32, 0.48]]))
    assert class_prior_loss(torch.tensor(LOGITS), weights, boundary=0.0).item() == pytest.approx(
        class_prior_loss(torch.tensor(LOGITS), weights).item())


def test_class_prior_rejects_bad_shapes():
    with pytest.raises(ValueError):
        class_prior_loss(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError):
        class_prior_loss(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


# ---------------------------------------------------------------- adversarial (CMI)

# sample 0: both argmax 0 (kept); sample 1: teacher argmax 1, student argmax 0 (masked out)
TEACHER_ADV = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
STUDENT_ADV = [[1.0, 0.0, 0.5], [1.0, 0.0, 0.0]]


def test_adversarial_kl_masks_disagreeing_samples():
    p_t, p_s = softmax(TEACHER_ADV[0]), softmax(STUDENT_ADV[0])
    expected = -(kl(p_t, p_s) + 0.0) / 2
    loss = adversarial_loss(torch.tensor(TEACHER_ADV), torch.tensor(STUDENT_ADV), divergence="kl")
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert expected < 0


def test_adversarial_js_value():
    p_t, p_s = softmax(TEACHER_ADV[0]), softmax(STUDENT_ADV[0])
    m = [(a + b) / 2 for a, b in zip(p_t, p_s)]
    expected = -(0.5 * kl(p_t, m) + 0.5 * kl(p_s, m)) / 2
    loss = adversarial_loss(torch.tensor(TEACHER_ADV), torch.tensor(STUDENT_ADV), divergence="js")
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_adversarial_all_disagree_is_zero_and_grads_reach_both_inputs():
    teacher = torch.tensor(TEACHER_ADV, requires_grad=True)
    student = torch.tensor(STUDENT_ADV, requires_grad=True)
    adversarial_loss(teacher, student).backward()
    assert teacher.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    assert torch.all(teacher.grad[1] == 0) and torch.all(student.grad[1] == 0)  # the masked sample gets nothing
    disagree = adversarial_loss(torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]]))
    assert disagree.item() == 0.0
    with pytest.raises(ValueError):
        adversarial_loss(teacher, student, divergence="l1")


# ---------------------------------------------------------------- Hinton KD


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_kd_kl_hand_value_and_tau_squared(tau):
    student, teacher = [[1.0, 0.0, 0.5], [0.0, 2.0, 1.0]], LOGITS
    mean_kl = sum(kl(softmax(t, tau), softmax(s, tau)) for s, t in zip(student, teacher)) / 2
    expected = tau**2 * mean_kl
    loss = kd_kl_loss(torch.tensor(student), torch.tensor(teacher), temperature=tau)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_kd_kl_teacher_detached_and_zero_when_equal():
    student = torch.tensor(LOGITS, requires_grad=True)
    teacher = torch.tensor(LOGITS[::-1], requires_grad=True)
    kd_kl_loss(student, teacher, temperature=4.0).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0
    assert kd_kl_loss(torch.tensor(LOGITS), torch.tensor(LOGITS), 2.0).item() == pytest.approx(0.0, abs=1e-7)


# ---------------------------------------------------------------- spatial attention, CAM, mSARC

# one sample, 2 channels, 2×2: channel 0 [[1, 2], [0, 1]], channel 1 [[1, 0], [2, 1]]
FEATURE = torch.tensor([[[[1.0, 2.0], [0.0, 1.0]], [[1.0, 0.0], [2.0, 1.0]]]])  # (1, 2, 2, 2)


def test_spatial_attention_hand_map():
    # mean_c F² = [(1+1)/2, (4+0)/2, (0+4)/2, (1+1)/2] = [1, 2, 2, 1], norm √10
    expected = [v / math.sqrt(10) for v in (1, 2, 2, 1)]
    assert spatial_attention(FEATURE)[0].tolist() == pytest.approx(expected, rel=1e-6)


def test_class_activation_map_hand_map():
    fc_weight = torch.tensor([[1.0, -1.0], [0.5, 2.0], [0.0, 0.0]])  # (K=3, C=2)
    cam = class_activation_map(FEATURE.repeat(3, 1, 1, 1), fc_weight, torch.tensor([0, 1, 2]))
    # class 0: ch0 − ch1 = [0, 2, −2, 0] -> ReLU [0, 2, 0, 0] -> [0, 1, 0, 0]
    assert cam[0].tolist() == pytest.approx([0.0, 1.0, 0.0, 0.0])
    # class 1: 0.5·ch0 + 2·ch1 = [2.5, 1, 4, 2.5], norm √29.5
    assert cam[1].tolist() == pytest.approx([v / math.sqrt(29.5) for v in (2.5, 1.0, 4.0, 2.5)], rel=1e-6)
    # class 2: all-zero weights -> all-zero CAM, not NaN
    assert cam[2].tolist() == [0.0, 0.0, 0.0, 0.0]


def test_msarc_zero_for_identical_features():
    torch.manual_seed(0)
    features = [torch.randn(2, 3, 4, 4), torch.randn(2, 5, 2, 2)]
    fc_weight = torch.randn(4, 5)
    logits = torch.randn(2, 4)
    loss = msarc_loss(features, [f.clone() for f in features], fc_weight, fc_weight.clone(), logits)
    assert loss.item() == pytest.approx(0.0, abs=1e-6)


STUDENT_GRID = [[1.0, -1.0, 2.0, 0.0], [0.0, 1.0, -2.0, 2.0], [-1.0, -1.0, 0.0, 1.0], [3.0, 0.0, 1.0, -1.0]]  # 4×4
TEACHER_GRID = [[1.0, 2.0], [-1.0, 0.5]]  # 2×2


def test_msarc_hand_value_with_resize_and_unmatched_shallow_stage():
    # one channel everywhere; the student's 4×4 last stage is pooled to the teacher's 2×2.
    # ŷ = argmax([0.1, 0.9]) = 1 -> student CAM weight −1, teacher CAM weight +1.
    student_feat = torch.tensor(STUDENT_GRID).view(1, 1, 4, 4)
    teacher_feat = torch.tensor(TEACHER_GRID).view(1, 1, 2, 2)
    shallow = torch.randn(1, 3, 8, 8)  # only the student has it: K = min(2, 1) = 1, so it must not matter
    student_fc, teacher_fc = torch.tensor([[1.0], [-1.0]]), torch.tensor([[2.0], [1.0]])
    teacher_logits = torch.tensor([[0.1, 0.9]])

    teacher_flat = [v for row in TEACHER_GRID for v in row]
    att_s = normalized(pool_2x2_blocks([[v * v for v in row] for row in STUDENT_GRID]))
    att_t = normalized([v * v for v in teacher_flat])
    cam_s = normalized(pool_2x2_blocks([[max(-v, 0.0) for v in row] for row in STUDENT_GRID]))
    cam_t = normalized([max(v, 0.0) for v in teacher_flat])
    expected = squared_distance(att_s, att_t) + squared_distance(cam_s, cam_t)

    loss = msarc_loss([shallow, student_feat], [teacher_feat], student_fc, teacher_fc, teacher_logits)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_msarc_gradient_to_student_only():
    torch.manual_seed(0)
    student = [torch.randn(2, 3, 4, 4, requires_grad=True), torch.randn(2, 4, 2, 2, requires_grad=True)]
    teacher = [torch.randn(2, 6, 8, 8, requires_grad=True), torch.randn(2, 8, 4, 4, requires_grad=True)]
    student_fc, teacher_fc = torch.randn(3, 4, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    msarc_loss(student, teacher, student_fc, teacher_fc, torch.randn(2, 3)).backward()
    assert all(f.grad is not None for f in student) and student_fc.grad is not None
    assert all(f.grad is None for f in teacher) and teacher_fc.grad is None


# ---------------------------------------------------------------- weighted sum


def test_weighted_sum_total_formula_and_active():
    inv = WeightedSum({"bn": 0.1, "cls": 10, "adv": 0.5, "off": 0.0}, name="L_inv")
    assert inv.active == ("bn", "cls", "adv")
    assert inv.formula() == "L_inv = 0.1·bn + 10·cls + 0.5·adv"
    total = inv({"bn": torch.tensor(2.0), "cls": torch.tensor(0.3), "adv": torch.tensor(-4.0)})
    assert total.item() == pytest.approx(0.1 * 2.0 + 10 * 0.3 + 0.5 * -4.0)
    with pytest.raises(KeyError):
        inv({"bn": torch.tensor(1.0), "cls": torch.tensor(1.0)})  # "adv" has a non-zero weight
    with pytest.raises(KeyError):
        inv({"bn": torch.tensor(1.0), "cls": torch.tensor(1.0), "adv": torch.tensor(1.0), "typo": torch.tensor(1.0)})


def test_weighted_sum_negative_and_all_zero():
    assert WeightedSum({"kl": 1.0, "msarc": -0.5}, name="L_kd").formula() == "L_kd = 1·kl - 0.5·msarc"
    off = WeightedSum({"kl": 0.0}, name="L_kd")
    assert off.active == () and off.formula() == "L_kd = 0"
    assert off({}).item() == 0.0


# ---------------------------------------------------------------- gradcheck-style sanity


def test_every_loss_finite_and_differentiable():
    torch.manual_seed(0)
    kw = {"dtype": torch.float64, "requires_grad": True}
    t_logits, s_logits = torch.randn(3, 4, **kw), torch.randn(3, 4, **kw)
    s_logits.data[:, :] = t_logits.data + 0.1 * torch.randn(3, 4, dtype=torch.float64)  # mostly agreeing argmax
    soft = torch.softmax(torch.randn(3, 4, dtype=torch.float64), dim=1)
    labels = torch.tensor([0, 2, 3])

    bn_model = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).double().eval()
    bn_model[1].running_mean.uniform_(-1, 1)
    bn_model[1].running_var.uniform_(0.5, 2)

    def bn_loss(x):
        with BNStatHooks(bn_model, first_multiplier=2.0) as bn:
            bn_model(x)
            return bn.loss()

    s_feats = [torch.randn(2, 2, 4, 4, **kw), torch.randn(2, 3, 2, 2, **kw)]
    t_feats = [torch.randn(2, 2, 2, 2, dtype=torch.float64), torch.randn(2, 3, 2, 2, dtype=torch.float64)]
    s_fc, t_fc = torch.randn(4, 3, **kw), torch.randn(4, 3, dtype=torch.float64)
    t_msarc_logits = torch.randn(2, 4, dtype=torch.float64)

    checks = {
        "bn": (bn_loss, (torch.randn(2, 2, 2, 2, **kw),)),
        "cls_int": (lambda z: class_prior_loss(z, labels), (t_logits,)),
        "cls_soft": (lambda z: class_prior_loss(z, soft), (t_logits,)),
        "cls_boundary": (lambda z: class_prior_loss(z, soft, boundary=0.3), (t_logits,)),
        "adv_kl": (lambda t, s: adversarial_loss(t, s, "kl"), (t_logits, s_logits)),
        "adv_js": (lambda t, s: adversarial_loss(t, s, "js"), (t_logits, s_logits)),
        "kd": (lambda s: kd_kl_loss(s, t_logits, 4.0), (s_logits,)),
        "msarc": (lambda a, b, w: msarc_loss([a, b], t_feats, w, t_fc, t_msarc_logits), (*s_feats, s_fc)),
    }
    for name, (fn, inputs) in checks.items():
        value = fn(*inputs)
        assert value.dim() == 0 and torch.isfinite(value), name
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, fast_mode=True), name

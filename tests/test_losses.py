import math

import pytest
import torch
import torch.nn.functional as F

from seqsetvae.batch import PAD_CODE
from seqsetvae.losses import (
    binary_focal_loss,
    free_bits_kl,
    gaussian_kl,
    history_loss,
    history_quantile_levels,
    history_threshold_grid,
    history_targets,
    mean_over_sets,
    reconstruction_losses,
    set_targets,
)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_focal_loss_positive_by_hand():
    p = sigmoid(0.5)
    expected = -((1 - p) ** 2) * math.log(p)
    loss = binary_focal_loss(torch.tensor([0.5]), torch.tensor([1.0]), gamma=2.0, alpha=None)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_negative_with_alpha_by_hand():
    p = sigmoid(-1.0)
    expected = -(1 - 0.25) * p**2 * math.log(1 - p)
    loss = binary_focal_loss(torch.tensor([-1.0]), torch.tensor([0.0]), gamma=2.0, alpha=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_positive_with_alpha_by_hand():
    p = sigmoid(2.0)
    expected = -0.25 * (1 - p) ** 0.5 * math.log(p)
    loss = binary_focal_loss(torch.tensor([2.0]), torch.tensor([1.0]), gamma=0.5, alpha=0.25)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_focal_loss_gamma_zero_is_bce():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, generator=generator) * 4
    targets = (torch.rand(64, generator=generator) < 0.3).float()
    expected = F.binary_cross_entropy_with_logits(logits, targets)
    assert torch.allclose(binary_focal_loss(logits, targets, gamma=0.0, alpha=None), expected, atol=1e-7)


def test_focal_loss_extreme_logits_finite():
    loss = binary_focal_loss(torch.tensor([-200.0, 200.0]), torch.tensor([1.0, 0.0]), gamma=2.0, reduction="none")
    assert torch.allclose(loss, torch.tensor([200.0, 200.0]))


def test_focal_loss_reductions():
    logits = torch.tensor([0.3, -1.2, 2.0])
    targets = torch.tensor([1.0, 0.0, 0.0])
    per_element = binary_focal_loss(logits, targets, gamma=1.5, reduction="none")
    assert per_element.shape == (3,)
    assert binary_focal_loss(logits, targets, gamma=1.5, reduction="sum").item() == pytest.approx(
        per_element.sum().item()
    )
    assert binary_focal_loss(logits, targets, gamma=1.5, reduction="mean").item() == pytest.approx(
        per_element.mean().item()
    )


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reduction": "max"}, "expected reduction"),
        ({"gamma": -1.0}, "expected gamma >= 0"),
        ({"alpha": 1.5}, "expected alpha in (0, 1)"),
    ],
)
def test_focal_loss_rejects_invalid_arguments(kwargs, message):
    arguments = {"gamma": 2.0, "alpha": None, "reduction": "mean", **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        binary_focal_loss(torch.zeros(2), torch.zeros(2), **arguments)


def test_focal_loss_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="expected targets of the logits shape"):
        binary_focal_loss(torch.zeros(2), torch.zeros(3), gamma=2.0)


def test_gaussian_kl_identical_is_zero():
    mu = torch.tensor([0.3, -2.0, 5.0])
    logvar = torch.tensor([-1.0, 0.0, 2.0])
    assert torch.allclose(gaussian_kl(mu, logvar, mu, logvar), torch.zeros(3))


def test_gaussian_kl_by_hand():
    # q = N(1, 1), p = N(0, e): 0.5 * (1/e + 1/e - 1 + ln e) = 1/e.
    kl = gaussian_kl(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([1.0]))
    assert kl.item() == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_gaussian_kl_by_hand_variance_only():
    # q = N(0, 4), p = N(0, 1): 0.5 * (4 - 1 - ln 4).
    kl = gaussian_kl(torch.tensor([0.0]), torch.tensor([math.log(4.0)]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert kl.item() == pytest.approx(0.5 * (4 - 1 - math.log(4.0)), rel=1e-6)


def test_mean_over_sets_ignores_padded_sets():
    per_set = torch.tensor([[1.0, 3.0, 100.0], [5.0, 100.0, 100.0]])
    set_mask = torch.tensor([[True, True, False], [True, False, False]])
    assert mean_over_sets(per_set, set_mask).item() == pytest.approx(3.0)


def test_mean_over_sets_without_valid_sets_is_zero():
    assert mean_over_sets(torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool)).tolist() == [0.0] * 4


def test_free_bits_clamps_each_dimension():
    # Two valid sets; per-dimension means are 0.01, 0.5 and 0.0.
    kl = torch.tensor([[[0.02, 0.4, 0.0], [0.0, 0.6, 0.0], [9.0, 9.0, 9.0]]])
    set_mask = torch.tensor([[True, True, False]])
    penalised, raw = free_bits_kl(kl, set_mask, free_bits=0.1)
    assert raw.item() == pytest.approx(0.51)
    assert penalised.item() == pytest.approx(0.1 + 0.5 + 0.1)


def test_free_bits_stops_gradient_below_threshold():
    kl = torch.tensor([[[0.01, 0.5]]], requires_grad=True)
    penalised, _ = free_bits_kl(kl, torch.tensor([[True]]), free_bits=0.1)
    penalised.backward()
    assert kl.grad.tolist() == [[[0.0, 1.0]]]


def hand_events():
    # One subject, two sets, four event slots. Set 0 has code 3 twice (values 1 and 3),
    # code 4 without a value and a padded slot with a stray code; set 1 has code 2 with value 0.
    codes = torch.tensor([[[3, 3, 4, 2], [2, 0, 0, 0]]])
    values = torch.tensor([[[1.0, 3.0, 0.0, 7.0], [0.0, 0.0, 0.0, 0.0]]])
    has_value = torch.tensor([[[True, True, False, True], [True, False, False, False]]])
    event_mask = torch.tensor([[[True, True, True, False], [True, False, False, False]]])
    return codes, values, has_value, event_mask


def test_set_targets_presence():
    targets = set_targets(*hand_events(), vocab_size=5)
    assert targets["presence"].tolist() == [[[0, 0, 0, 1, 1], [0, 0, 1, 0, 0]]]


def test_set_targets_mean_value():
    targets = set_targets(*hand_events(), vocab_size=5)
    assert targets["value"].tolist() == [[[0, 0, 0, 2.0, 0], [0, 0, 0.0, 0, 0]]]


def test_set_targets_has_value():
    targets = set_targets(*hand_events(), vocab_size=5)
    assert targets["has_value"].tolist() == [[[False, False, False, True, False], [False, False, True, False, False]]]


def test_reconstruction_ignores_pad_column():
    targets = set_targets(*hand_events(), vocab_size=5)
    set_mask = torch.tensor([[True, True]])
    logits = torch.zeros(1, 2, 5)
    shifted = logits.clone()
    shifted[..., PAD_CODE] = 50.0
    presence, _ = reconstruction_losses(logits, torch.zeros(1, 2, 5), targets, set_mask)
    presence_shifted, _ = reconstruction_losses(shifted, torch.zeros(1, 2, 5), targets, set_mask)
    assert presence_shifted.item() == pytest.approx(presence.item())


def test_reconstruction_by_hand():
    targets = set_targets(*hand_events(), vocab_size=5)
    set_mask = torch.tensor([[True, True]])
    # Zero logits: each of the 4 non-PAD codes costs ln 2 per set.
    # Values predicted 1.0: set 0 has code 3 (target 2) and set 1 code 2 (target 0), each 0.5 * 1^2.
    presence, value = reconstruction_losses(torch.zeros(1, 2, 5), torch.ones(1, 2, 5), targets, set_mask)
    assert presence.item() == pytest.approx(4 * math.log(2.0), rel=1e-6)
    assert value.item() == pytest.approx(0.5, rel=1e-6)


def reference_history(value: torch.Tensor, has_value: torch.Tensor, presence: torch.Tensor) -> dict:
    """Per-code running statistics by explicit loops over subjects, sets and codes."""
    b, s, v = value.shape
    out = {"values": torch.zeros(b, s, v, 4), "has_value": torch.zeros(b, s, v, dtype=torch.bool)}
    out["log_count"], out["seen"] = torch.zeros(b, s, v), torch.zeros(b, s, v)
    for i in range(b):
        for code in range(v):
            seen_values, count = [], 0
            for t in range(s):
                if has_value[i, t, code]:
                    seen_values.append(float(value[i, t, code]))
                count += int(presence[i, t, code])
                out["log_count"][i, t, code] = math.log1p(count)
                out["seen"][i, t, code] = float(count > 0)
                if seen_values:
                    out["has_value"][i, t, code] = True
                    statistics = [seen_values[-1], min(seen_values), max(seen_values), sum(seen_values) / len(seen_values)]
                    out["values"][i, t, code] = torch.tensor(statistics)
    return out


def test_history_targets_by_hand():
    # Code 3 has value 2.0 in set 0; code 2 has value 0.0 in set 1.
    history = history_targets(set_targets(*hand_events(), vocab_size=5))
    assert history["values"][0, 1, 3].tolist() == [2.0, 2.0, 2.0, 2.0]
    assert history["has_value"][0, :, 2].tolist() == [False, True]
    assert history["seen"][0, :, 4].tolist() == [1.0, 1.0]
    assert history["log_count"][0, 1, 3].item() == pytest.approx(math.log(2.0))


def test_history_targets_match_loop_reference():
    generator = torch.Generator().manual_seed(3)
    value = torch.randn(3, 6, 5, generator=generator)
    presence = (torch.rand(3, 6, 5, generator=generator) < 0.4).float()
    has_value = (presence > 0) & (torch.rand(3, 6, 5, generator=generator) < 0.7)
    value = value * has_value
    history = history_targets({"value": value, "has_value": has_value, "presence": presence})
    expected = reference_history(value, has_value, presence)
    assert torch.equal(history["has_value"], expected["has_value"])
    for key in ("values", "log_count", "seen"):
        torch.testing.assert_close(history[key], expected[key])


def test_history_loss_skips_unvalued_and_padded():
    history = history_targets(set_targets(*hand_events(), vocab_size=5))
    perfect = torch.cat(
        [history["values"], history["log_count"][..., None], torch.full((1, 2, 5, 1), -30.0)], dim=-1
    )
    perfect[..., 5] = torch.where(history["seen"] > 0, 30.0, -30.0)
    loss = history_loss(perfect, history, torch.tensor([[True, True]]))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)
    # A wrong statistic of a code that has no value yet costs nothing; one of a valued code does.
    wrong_unvalued = perfect.clone()
    wrong_unvalued[0, 0, 2, :4] = 9.0
    assert history_loss(wrong_unvalued, history, torch.tensor([[True, True]])).item() == pytest.approx(0.0, abs=1e-6)
    wrong_valued = perfect.clone()
    wrong_valued[0, 0, 3, 0] += 1.0
    assert history_loss(wrong_valued, history, torch.tensor([[True, True]])).item() == pytest.approx(0.25)
    assert history_loss(wrong_valued, history, torch.tensor([[False, True]])).item() == pytest.approx(0.0, abs=1e-6)


def test_history_threshold_grid():
    assert history_threshold_grid(0) == ()
    assert history_threshold_grid(1) == (0.0,)
    assert history_threshold_grid(5) == (-2.0, -1.0, 0.0, 1.0, 2.0)


def test_history_above_targets_by_hand():
    # Code 3 has value 2.0 in set 0 and code 2 has value 0.0 in set 1. Code 4 has no value.
    history = history_targets(set_targets(*hand_events(), vocab_size=5), thresholds=(-1.0, 1.0))
    assert history["above"].shape == (1, 2, 5, 8)
    # Every statistic of code 3 is 2.0: above both thresholds.
    assert history["above"][0, 1, 3].tolist() == [1.0] * 8
    # Every statistic of code 2 in set 1 is 0.0: above -1, not above 1.
    assert history["above"][0, 1, 2].tolist() == [1.0, 0.0] * 4
    assert "above" not in history_targets(set_targets(*hand_events(), vocab_size=5))
    # Code 4 has no value, so it is above no threshold.
    assert history["above"][0, 1, 4].tolist() == [0.0] * 8


def test_history_quantile_levels():
    assert history_quantile_levels(0) == ()
    assert history_quantile_levels(1) == (0.5,)
    assert history_quantile_levels(3) == (0.25, 0.5, 0.75)


def test_history_above_targets_per_code():
    # Code 3 has value 2.0 and code 2 has value 0.0; each code is compared with its own row.
    table = torch.tensor([[9.0, 9.0], [9.0, 9.0], [-0.5, 0.5], [1.5, 2.5], [-9.0, -9.0]])
    history = history_targets(set_targets(*hand_events(), vocab_size=5), thresholds=table)
    assert history["above"].shape == (1, 2, 5, 8)
    assert history["above"][0, 1, 3].tolist() == [1.0, 0.0] * 4
    assert history["above"][0, 1, 2].tolist() == [1.0, 0.0] * 4
    # Code 4 has no value: its threshold of -9 would be crossed by 0, but the target stays 0.
    assert history["above"][0, 1, 4].tolist() == [0.0] * 8
    # Before code 2's first value in set 1 it is above nothing.
    assert history["above"][0, 0, 2].tolist() == [0.0] * 8


def test_history_above_targets_per_statistic():
    # Code 1 has value 1.0 in set 0 and 3.0 in set 1: last 3, min 1, max 3, mean 2 at set 1.
    value = torch.tensor([[[0.0, 1.0], [0.0, 3.0]]])
    has_value = torch.tensor([[[False, True], [False, True]]])
    history = history_targets({"value": value, "has_value": has_value, "presence": has_value.float()}, (1.5, 2.5))
    assert history["above"][0, 1, 1].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0]


def test_above_loss_valued_codes_only():
    history = history_targets(set_targets(*hand_events(), vocab_size=5), thresholds=(0.5,))
    perfect = torch.cat(
        [history["values"], history["log_count"][..., None], torch.zeros(1, 2, 5, 1), history["above"]], dim=-1
    )
    perfect[..., 5] = torch.where(history["seen"] > 0, 30.0, -30.0)
    set_mask = torch.tensor([[True, True]])
    assert history_loss(perfect, history, set_mask).item() == pytest.approx(0.0, abs=1e-6)
    wrong_unvalued = perfect.clone()
    wrong_unvalued[0, :, 4, 6:] = 1.0  # Code 4 never has a value.
    assert history_loss(wrong_unvalued, history, set_mask).item() == pytest.approx(0.0, abs=1e-6)
    wrong_valued = perfect.clone()
    wrong_valued[0, 1, 3, 6] -= 1.0  # Code 3's last value is above 0.5.
    assert history_loss(wrong_valued, history, set_mask).item() == pytest.approx(0.25)

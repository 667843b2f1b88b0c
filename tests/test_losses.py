import math

import pytest
import torch

from ds_dpo.losses import LOSS_TYPES, preference_loss


def worked_example(dtype=torch.float64):
    t = lambda xs: torch.tensor(xs, dtype=dtype)  # noqa: E731
    return t([-2.3, -3.1]), t([-4.2, -5.0]), t([-2.5, -3.0]), t([-3.8, -4.5])


def test_sigmoid_worked_example():
    """beta = 0.5, two pairs.

    pair 1: chosen log-ratio -2.3 - (-2.5) = 0.2, rejected log-ratio -4.2 - (-3.8) = -0.4
            h = 0.6, beta * h = 0.3, loss = -log sigmoid(0.3) = log(1 + e^-0.3) = 0.5543552444685271
            rewards: chosen 0.5 * 0.2 = 0.1, rejected 0.5 * -0.4 = -0.2
    pair 2: chosen log-ratio -3.1 - (-3.0) = -0.1, rejected log-ratio -5.0 - (-4.5) = -0.5
            h = 0.4, beta * h = 0.2, loss = log(1 + e^-0.2) = 0.5981388693815918
            rewards: chosen -0.05, rejected -0.25
    mean loss = 0.5762470569250595
    """
    out = preference_loss(*worked_example(), loss_type="sigmoid", beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.5543552444685271, 0.5981388693815918], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.5762470569250595, abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, -0.05], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.2, -0.25], dtype=torch.float64))


def test_sigmoid_label_smoothing_worked_example():
    """cDPO, eps = 0.1: loss = 0.9 * log(1 + e^-z) + 0.1 * log(1 + e^z), z = 0.3 and 0.2 as above.

    pair 1: 0.9 * 0.5543552444685271 + 0.1 * (0.3 + 0.5543552444685271) = 0.5843552444685272
    pair 2: 0.9 * 0.5981388693815918 + 0.1 * (0.2 + 0.5981388693815918) = 0.6181388693815918
    """
    out = preference_loss(*worked_example(), loss_type="sigmoid", beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.5843552444685272, 0.6181388693815918], dtype=torch.float64))


def test_policy_equal_to_reference_gives_ln2():
    logps = torch.randn(4, dtype=torch.float64)
    out = preference_loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_gradient_matches_closed_form():
    """d loss_i / d chosen_logps_i = -beta * sigmoid(-beta * h_i) / B for the mean loss."""
    chosen, rejected, ref_c, ref_r = worked_example()
    chosen.requires_grad_(True)
    preference_loss(chosen, rejected, ref_c, ref_r, beta=0.5).loss.backward()
    h = torch.tensor([0.6, 0.4], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, -0.5 * torch.sigmoid(-0.5 * h) / 2)


def test_registry_and_errors():
    assert "sigmoid" in LOSS_TYPES
    with pytest.raises(ValueError, match="unknown loss_type"):
        preference_loss(*worked_example(), loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        preference_loss(*worked_example(), label_smoothing=0.5)

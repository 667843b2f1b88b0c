import dataclasses
import math

import pytest
import torch

from ds_dpo.forward.logprobs import completion_logps, wpo_logps
from ds_dpo.losses import LOSS_TYPES, LossConfig, LossInputs, preference_loss
from helpers.trl_oracle import build_trainer, trl_loss

_OPTIONS = {f.name for f in dataclasses.fields(LossConfig)}


def loss(*tensors, **kwargs):
    """``preference_loss`` on positional [B] tensors (LossInputs' order) and keyword options or inputs, the options
    validated first as a run validates them (ValueError listing the problems)."""
    options = LossConfig(**{k: v for k, v in kwargs.items() if k in _OPTIONS})
    inputs = {k: v for k, v in kwargs.items() if k not in _OPTIONS}
    if options.problems():
        raise ValueError("; ".join(options.problems()))
    return preference_loss(LossInputs(*tensors, **inputs), options)


def needs_reference(loss_type, reference_free=False):
    return LossConfig(loss_type=loss_type, reference_free=reference_free).needs_reference


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
    out = loss(*worked_example(), loss_type="sigmoid", beta=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([0.5543552444685271, 0.5981388693815918], dtype=torch.float64))
    assert out.loss.item() == pytest.approx(0.5762470569250595, abs=1e-12)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.1, -0.05], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.2, -0.25], dtype=torch.float64))


def test_sigmoid_label_smoothing_worked_example():
    """cDPO, eps = 0.1: loss = 0.9 * log(1 + e^-z) + 0.1 * log(1 + e^z), z = 0.3 and 0.2 as above.

    pair 1: 0.9 * 0.5543552444685271 + 0.1 * (0.3 + 0.5543552444685271) = 0.5843552444685272
    pair 2: 0.9 * 0.5981388693815918 + 0.1 * (0.2 + 0.5981388693815918) = 0.6181388693815918
    """
    out = loss(*worked_example(), loss_type="sigmoid", beta=0.5, label_smoothing=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.5843552444685272, 0.6181388693815918], dtype=torch.float64))


def test_policy_equal_to_reference_gives_ln2():
    logps = torch.randn(4, dtype=torch.float64)
    out = loss(logps, logps - 1, logps, logps - 1, beta=0.1)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)


def test_gradient_matches_closed_form():
    """d loss_i / d chosen_logps_i = -beta * sigmoid(-beta * h_i) / B for the mean loss."""
    chosen, rejected, ref_c, ref_r = worked_example()
    chosen.requires_grad_(True)
    loss(chosen, rejected, ref_c, ref_r, beta=0.5).loss.backward()
    h = torch.tensor([0.6, 0.4], dtype=torch.float64)
    torch.testing.assert_close(chosen.grad, -0.5 * torch.sigmoid(-0.5 * h) / 2)


def test_registry_and_errors():
    assert "sigmoid" in LOSS_TYPES
    with pytest.raises(ValueError, match="unknown `loss_type`"):
        loss(*worked_example(), loss_type="nope")
    with pytest.raises(ValueError, match="label_smoothing"):
        loss(*worked_example(), label_smoothing=0.5)


# --- parity with TRL 1.16 ---------------------------------------------------------------------------------------------

TRL_TYPES = [
    "sigmoid",
    "hinge",
    "ipo",
    "exo_pair",
    "nca_pair",
    "robust",
    "bco_pair",
    "sppo_hard",
    "aot",
    "aot_unpaired",
    "apo_zero",
    "apo_down",
    "discopop",
    "sft",
    "sigmoid_norm",
]
F_DIV_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"]
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def random_case(dtype=torch.float64, pairs=6, length=14, seed=0):
    """Uneven prompts (>= 1 token) and completions; per-token log-probs for policy and a different reference."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    completion_mask = torch.zeros(n, length, dtype=torch.bool)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    for i in range(n):
        p = int(torch.randint(1, 5, (1,), generator=g))
        c = int(torch.randint(1, length - p + 1, (1,), generator=g))
        completion_mask[i, p : p + c] = True
        attention_mask[i, : p + c] = 1
    inputs = {
        "input_ids": torch.zeros(n, length, dtype=torch.long),
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }
    policy = -3 * torch.rand(n, length - 1, generator=g, dtype=torch.float64)
    ref = policy + 0.8 * torch.randn(n, length - 1, generator=g, dtype=torch.float64)
    log_sum_sq = -torch.rand(n, length - 1, generator=g, dtype=torch.float64)
    return inputs, policy.to(dtype), ref.to(dtype).clamp(max=0), log_sum_sq.to(dtype)


def ds_dpo_loss(inputs, policy, ref, log_sum_sq, ld_alpha=None, use_weighting=False, **options):
    """ds_dpo's loss and gradient w.r.t. the per-token policy log-probs, through its own reduction functions."""
    tokens = policy.clone().requires_grad_(True)
    mask = inputs["completion_mask"][:, 1:]
    n = mask.shape[0]
    # the scored-token form of ds_dpo's batches: one entry per completion token
    sequence = torch.arange(n).unsqueeze(1).expand_as(mask)[mask]
    rank = mask.cumsum(-1)[mask]
    lengths, pairs = mask.sum(-1), torch.arange(n)  # chosen of pair i is sequence i, its rejected n/2 + i
    logps = completion_logps(tokens[mask], sequence, rank, pairs, lengths, ld_alpha)
    ref_logps = completion_logps(ref[mask], sequence, rank, pairs, lengths, ld_alpha)
    wpo = wpo_logps(tokens[mask], log_sum_sq[mask], sequence, n).chunk(2) if use_weighting else (None, None)
    out = loss(
        *logps.chunk(2),
        *ref_logps.chunk(2),
        *lengths.chunk(2),
        use_weighting=use_weighting,
        chosen_wpo_logps=wpo[0],
        rejected_wpo_logps=wpo[1],
        **options,
    )
    (grad,) = torch.autograd.grad(out.loss, tokens)
    return out.loss.detach(), grad


@pytest.fixture(scope="module")
def trl_trainer(builtin_files, tmp_path_factory):
    return build_trainer(builtin_files["model_name_or_path"], str(tmp_path_factory.mktemp("trl")))


def assert_parity(trainer, dtype=torch.float64, seed=0, **options):
    inputs, policy, ref, log_sum_sq = random_case(dtype, seed=seed)
    expected, expected_grad = trl_loss(trainer, inputs, policy, ref, log_sum_sq, **options)
    got, grad = ds_dpo_loss(inputs, policy, ref, log_sum_sq, **options)
    assert got.dtype == expected.dtype == dtype
    tol = TOLERANCE[dtype]
    assert abs(got.item() - expected.item()) <= tol, (got.item(), expected.item())
    torch.testing.assert_close(grad, expected_grad, atol=tol, rtol=0)
    assert grad.abs().sum() > 0 or options.get("loss_type") in ("hinge",)


@pytest.mark.parametrize("loss_type", TRL_TYPES)
@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_trl_parity(trl_trainer, loss_type, beta):
    # TRL 1.16 reads label_smoothing only in robust, exo_pair and the aot types (its sigmoid ignores it)
    smoothings = [0.0, 0.2] if loss_type in ("robust", "aot", "aot_unpaired") else [0.0]
    if loss_type == "exo_pair":
        smoothings = [1e-3, 0.2]
    for seed, eps in enumerate(smoothings):
        assert_parity(trl_trainer, seed=seed, loss_type=loss_type, beta=beta, label_smoothing=eps)
    assert_parity(trl_trainer, dtype=torch.float32, loss_type=loss_type, beta=beta, label_smoothing=smoothings[-1])


@pytest.mark.parametrize("loss_type", F_DIV_TYPES)
@pytest.mark.parametrize("divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_trl_parity_f_divergences(trl_trainer, loss_type, divergence):
    eps = 1e-3 if loss_type == "exo_pair" else 0.0
    # TRL's alpha-divergence has no float64 path (its clamp table covers fp16/bf16/fp32 only)
    dtypes = [torch.float32] if divergence == "alpha_divergence" else [torch.float64, torch.float32]
    for dtype in dtypes:
        for coef in [0.3, 1.5] if divergence == "alpha_divergence" else [0.5]:
            assert_parity(
                trl_trainer,
                dtype=dtype,
                loss_type=loss_type,
                beta=0.3,
                label_smoothing=eps,
                f_divergence_type=divergence,
                f_alpha_divergence_coef=coef,
            )


@pytest.mark.parametrize(
    "options",
    [
        dict(loss_type=["sigmoid", "sft"]),  # RPO
        dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),  # MPO
        dict(loss_type=["ipo", "apo_zero", "discopop"], loss_weights=[1.0, 0.5, 0.25], discopop_tau=0.1),
        dict(loss_type="sigmoid", use_weighting=True),  # WPO
        # (TRL 1.16 crashes on sft with use_weighting: an in-place multiply of an expanded tensor)
        dict(loss_type=["sigmoid", "bco_pair"], loss_weights=[1.0, 0.3], use_weighting=True),
        dict(loss_type="ipo", use_weighting=True),
        dict(loss_type="sigmoid", ld_alpha=0.5),  # LD-DPO
        # (with ld_alpha, TRL's sft term reads the raw token log-probs; ds_dpo's reads the LD-weighted ones, see docs)
        dict(loss_type=["robust", "apo_zero"], label_smoothing=0.1, ld_alpha=0.3),
        dict(loss_type="sigmoid_norm", ld_alpha=0.0, use_weighting=True),
    ],
)
def test_trl_parity_mixtures_wpo_ld(trl_trainer, options):
    for dtype in (torch.float64, torch.float32):
        assert_parity(trl_trainer, dtype=dtype, beta=0.25, **options)


# --- beyond TRL's DPOTrainer: hand-computed cases ---------------------------------------------------------------------


def test_simpo_hand_computed():
    """beta 2, gamma 0.5, one pair: chosen -6 over 3 tokens (avg -2), rejected -12 over 4 tokens (avg -3).
    z = 2 * (-2 - (-3)) - 0.5 = 1.5; loss = log(1 + e^-1.5) = 0.2014132779827524."""
    out = loss(
        torch.tensor([-6.0]),
        torch.tensor([-12.0]),
        None,
        None,
        torch.tensor([3]),
        torch.tensor([4]),
        loss_type="simpo",
        beta=2.0,
        simpo_gamma=0.5,
    )
    assert out.loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), abs=1e-7)
    assert out.loss.item() == pytest.approx(0.2014132779827524, abs=1e-7)


def test_orpo_hand_computed():
    """beta (lambda) 0.5, one pair: chosen -1 over 2 tokens (avg log P_w = -0.5), rejected -3 over 3 (avg -1).
    log odds(y) = a - log(1 - e^a): w: -0.5 - log(1 - e^-0.5) = 0.4327521295671886;
    l: -1 - log(1 - e^-1) = -0.5413248546129181; difference 0.9740769841801067;
    L_OR = -log sigmoid(0.97407698) = 0.3202997852; L_SFT = 1 / 2 = 0.5;
    loss = 0.5 + 0.5 * 0.3202997852 = 0.6601498926."""
    out = loss(
        torch.tensor([-1.0], dtype=torch.float64),
        torch.tensor([-3.0], dtype=torch.float64),
        None,
        None,
        torch.tensor([2]),
        torch.tensor([3]),
        loss_type="orpo",
        beta=0.5,
    )
    odds = lambda a: a - math.log(1 - math.exp(a))  # noqa: E731
    l_or = math.log1p(math.exp(-(odds(-0.5) - odds(-1.0))))
    assert out.loss.item() == pytest.approx(0.5 + 0.5 * l_or, abs=1e-12)
    assert out.loss.item() == pytest.approx(0.6601498926, abs=1e-9)


def test_cpo_hand_computed():
    """beta 0.1, alpha 1, two pairs: chosen (-4, -6) over (2, 3) tokens, rejected (-9, -5).
    z = 0.1 * (5, -1) = (0.5, -0.1); -log sigmoid: (0.47407698418, 0.74439666007);
    NLL = (4 + 6) / (2 + 3) = 2; loss = mean + 2 = 2.6092368221."""
    out = loss(
        torch.tensor([-4.0, -6.0], dtype=torch.float64),
        torch.tensor([-9.0, -5.0], dtype=torch.float64),
        None,
        None,
        torch.tensor([2, 3]),
        torch.tensor([4, 4]),
        loss_type="cpo",
        beta=0.1,
    )
    expected = (math.log1p(math.exp(-0.5)) + math.log1p(math.exp(0.1))) / 2 + 2.0
    assert out.loss.item() == pytest.approx(expected, abs=1e-12)
    assert out.loss.item() == pytest.approx(2.6092368221, abs=1e-9)


def test_ipo_sum_and_reference_free():
    """ipo_sum, beta 0.5: h = 0.6 and 0.4 (the worked example); (h - 1)^2 = 0.16, 0.36 -> mean 0.26.
    reference_free sigmoid: h = (-2.3 + 4.2, -3.1 + 5.0) = (1.9, 1.9); loss = log(1 + e^-0.95)."""
    out = loss(*worked_example(), loss_type="ipo_sum", beta=0.5)
    assert out.loss.item() == pytest.approx(0.26, abs=1e-12)
    free = loss(*worked_example(), loss_type="sigmoid", beta=0.5, reference_free=True)
    assert free.loss.item() == pytest.approx(math.log1p(math.exp(-0.95)), abs=1e-12)
    torch.testing.assert_close(free.chosen_rewards, 0.5 * worked_example()[0])


def test_sft_is_token_level_mean():
    out = loss(
        torch.tensor([-4.0, -6.0]),
        torch.tensor([-1.0, -1.0]),
        None,
        None,
        torch.tensor([2, 8]),
        torch.tensor([1, 1]),
        loss_type="sft",
    )
    assert out.loss.item() == pytest.approx(1.0)  # (4 + 6) / (2 + 8)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(loss_type="exo_pair"), "exo_pair needs label_smoothing > 0"),
        (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "loss_weights has 1 entries but loss_type has 2"),
        (dict(loss_type="ipo"), r"\['ipo'\] need chosen_lengths"),
        (dict(loss_type="nca_pair", f_divergence_type="forward_kl"), "not defined for \\['nca_pair'\\]"),
        (dict(loss_type="sigmoid", f_divergence_type="chi2"), "f_divergence_type must be one of"),
        (dict(loss_type="aot", use_weighting=True), "cannot be combined with aot"),
        (dict(loss_type="sigmoid", use_weighting=True), "needs chosen_wpo_logps"),
        (dict(loss_type=[]), "at least one"),
    ],
)
def test_invalid_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        loss(*worked_example(), **kwargs)


def test_reference_needed_unless_reference_free():
    c, r, _, _ = worked_example()
    with pytest.raises(ValueError, match="need reference log-probs"):
        loss(c, r, None, None, loss_type="sigmoid")
    assert needs_reference(["simpo", "sft"]) is False and needs_reference(["simpo", "sigmoid"]) is True
    assert needs_reference("sigmoid", reference_free=True) is False
    assert {"simpo", "orpo", "cpo", "ipo_sum", *TRL_TYPES} == set(LOSS_TYPES)

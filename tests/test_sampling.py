import numpy as np
import pytest

from vl2edge.errors import InputError
from vl2edge.sampling import SamplingParams, adjust, apply_repetition_penalty, log_softmax, sample, top_p_filter


def test_greedy_is_argmax():
    logits = np.array([[0.1, 3.0, -1.0], [5.0, 4.0, 4.9]], np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(0)).tolist() == [1, 0]


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([[2.0, 1.9, -1.0]], np.float32)
    pen = apply_repetition_penalty(logits, [np.array([0, 2, 2])], 1.1)
    assert pen[0].tolist() == pytest.approx([2.0 / 1.1, 1.9, -1.1])
    assert sample(logits, SamplingParams(repetition_penalty=1.1), np.random.default_rng(0),
                  [np.array([0])]).tolist() == [1]


def test_top_p_keeps_the_smallest_nucleus():
    p = np.array([[0.5, 0.3, 0.15, 0.05]])
    out = top_p_filter(np.log(p), 0.75)
    assert np.isfinite(out[0]).tolist() == [True, True, False, False]
    assert np.isfinite(top_p_filter(np.log(p), 0.01)[0]).tolist() == [True, False, False, False]


def test_sampling_is_seeded_and_follows_the_distribution():
    logits = np.log(np.array([[0.6, 0.3, 0.1]]))
    params = SamplingParams(temperature=1.0)
    a = [int(sample(logits, params, np.random.default_rng(7))[0]) for _ in range(3)]
    assert len(set(a)) == 1
    rng = np.random.default_rng(1)
    counts = np.bincount([int(sample(logits, params, rng)[0]) for _ in range(4000)], minlength=3) / 4000
    assert np.allclose(counts, [0.6, 0.3, 0.1], atol=0.03)
    # low temperature concentrates on the mode
    cold = [int(sample(logits, SamplingParams(temperature=0.05), rng)[0]) for _ in range(200)]
    assert cold.count(0) == 200


@pytest.mark.parametrize("kw", [{"temperature": -1}, {"top_p": -0.1}, {"top_p": 1.5}, {"repetition_penalty": 0},
                                {"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"logit_bias": ((1, 101),)},
                                {"logit_bias": ((-1, 1),)}])
def test_bad_parameters(kw):
    with pytest.raises(InputError):
        SamplingParams(**kw)


def test_top_p_zero_is_greedy_even_when_hot():
    logits = np.array([[0.0, 1.0, 0.9]], np.float32)
    rng = np.random.default_rng(0)
    assert {int(sample(logits, SamplingParams(temperature=2.0, top_p=0.0), rng)[0]) for _ in range(50)} == {1}


def test_frequency_and_presence_penalties_count_the_answer_only():
    """logit -= count * frequency + (count > 0) * presence, over the generated tokens (OpenAI's formula)."""
    logits = np.array([[5.0, 4.0, 0.0]], np.float32)
    params = SamplingParams(frequency_penalty=0.75, presence_penalty=0.5)
    x = adjust(logits, params, seen=[np.array([0, 0, 0, 1])], generated=[np.array([0, 0, 1])])
    np.testing.assert_allclose(x, [[5.0 - 2 * 0.75 - 0.5, 4.0 - 0.75 - 0.5, 0.0]])
    assert int(sample(logits, params, np.random.default_rng(0), generated=[np.array([0, 0, 1])])[0]) == 0
    assert int(sample(logits, params, np.random.default_rng(0), generated=[np.array([0, 0, 0, 0])])[0]) == 1


def test_logit_bias_adds_per_token_and_can_ban():
    logits = np.array([[1.0, 2.0, 3.0]], np.float32)
    params = SamplingParams(logit_bias=((2, -100.0), (0, 5.0), (7, 1.0)))  # 7 is past the vocabulary: ignored
    np.testing.assert_allclose(adjust(logits, params), [[6.0, 2.0, -97.0]])
    assert int(sample(logits, params, np.random.default_rng(0))[0]) == 0


def test_log_softmax_normalises_and_keeps_masked_tokens_at_minus_infinity():
    x = np.array([[1.0, -np.inf, 3.0, 0.5]])
    lp = log_softmax(x)
    assert np.isneginf(lp[0, 1]) and abs(np.exp(lp).sum() - 1) < 1e-12
    np.testing.assert_allclose(lp[0, 2] - lp[0, 0], 2.0)

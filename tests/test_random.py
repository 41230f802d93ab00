"""The keyed streams: reproducible, key-sensitive, and independent of how indices are split."""
import torch
from hypothesis import given, settings, strategies as st

from twin.random import BLOCK, Streams


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 3 * BLOCK), cut=st.floats(0, 1), seed=st.integers(0, 2**31))
def test_split_draws_equal_whole_draw(n, cut, seed):
    """A rank drawing its slice of global indices gets exactly the serial draw's numbers."""
    s = Streams(seed)
    idx = torch.arange(n)
    whole = s.normal("obs_noise", (5,), idx)
    k = int(cut * n)
    parts = torch.cat([s.normal("obs_noise", (5,), idx[:k]), s.normal("obs_noise", (5,), idx[k:])])
    assert torch.equal(whole, parts)


def test_keys_and_purposes_give_different_streams():
    idx = torch.arange(100)
    s = Streams(1)
    a = s.normal("obs_noise", (0,), idx)
    assert not torch.equal(a, s.normal("obs_noise", (1,), idx))
    assert not torch.equal(a, s.normal("init", (0,), idx))
    assert not torch.equal(a, Streams(2).normal("obs_noise", (0,), idx))
    assert torch.equal(a, Streams(1).normal("obs_noise", (0,), idx))


def test_draws_look_standard_normal_and_uniform():
    s = Streams(7)
    x = s.normal("test", (), torch.arange(200_000))
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1) < 0.01
    u = s.uniform("test", (), torch.arange(200_000))
    assert float(u.min()) >= 0 and float(u.max()) < 1 and abs(float(u.mean()) - 0.5) < 0.01


def test_field_normal_of_a_subdomain_is_a_slice_of_the_global_field():
    s = Streams(3)
    full = s.field_normal("init", (0,), 3, 2, torch.arange(12 * 10), (12, 10))
    rows = torch.arange(12 * 10).reshape(12, 10)[4:9, 3:7]
    tile = s.field_normal("init", (0,), 3, 2, rows.reshape(-1), (5, 4))
    assert torch.equal(full[:, :, 4:9, 3:7], tile)


def test_unknown_purpose_is_rejected():
    try:
        Streams(0).normal("nonsense", (), torch.arange(3))
    except ValueError as e:
        assert "nonsense" in str(e)
    else:
        raise AssertionError("expected ValueError")

"""EMA update and the feature-queue ring buffer."""

import pytest
import torch

from albef.models.momentum import enqueue_, momentum_update


def test_momentum_update_is_the_ema_rule():
    torch.manual_seed(0)
    online = [torch.randn(3, 4), torch.randn(5)]
    momentum = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * m + 0.1 * o for m, o in zip(momentum, online)]
    before = [o.clone() for o in online]
    momentum_update(online, momentum, 0.9)
    for got, want in zip(momentum, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for o, b in zip(online, before):
        assert torch.equal(o, b)


@pytest.mark.parametrize("batch_sizes", [[2, 3, 4, 1], [5, 5, 5], [7], [1, 12, 3], [3, 5, 2, 6, 4]])
def test_queue_keeps_the_newest_columns_in_fifo_order(batch_sizes):
    size = 5
    features = torch.tensor([[-1.0], [1.0]]).repeat(1, size)  # initial id -1 in row 0, its negation in row 1
    ids = torch.full((1, size), -1)
    ptr = torch.zeros(1, dtype=torch.long)
    history = [-1] * size  # every value ever in the queue, oldest first
    counter = 0
    for n in batch_sizes:
        values = torch.arange(counter, counter + n)
        counter += n
        history += values.tolist()
        enqueue_([features, ids], ptr, [torch.stack([values, -values]).float(), values[None, :]])
        fifo = torch.roll(ids[0], -int(ptr)).tolist()  # oldest column sits at ptr
        assert fifo == history[-size:]
        assert torch.equal(features[0], ids[0].float()) and torch.equal(features[1], -features[0])
    assert int(ptr) == sum(batch_sizes) % size

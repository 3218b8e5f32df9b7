"""Explicit FSDP prefetch: which blocks each block all-gathers ahead, in forward and in backward."""

from fitscale.parallel.fsdp import prefetch_blocks


class RecordingBlock:
    def __init__(self, index: int):
        self.index, self.forward, self.backward = index, None, None

    def set_modules_to_forward_prefetch(self, modules):
        self.forward = [m.index for m in modules]

    def set_modules_to_backward_prefetch(self, modules):
        self.backward = [m.index for m in modules]


def test_each_block_prefetches_the_next_in_forward_and_the_previous_nearest_first_in_backward():
    blocks = [RecordingBlock(i) for i in range(5)]
    prefetch_blocks(blocks, 2)
    assert [b.forward for b in blocks] == [[1, 2], [2, 3], [3, 4], [4], []]
    assert [b.backward for b in blocks] == [[], [0], [1, 0], [2, 1], [3, 2]]
    prefetch_blocks(blocks, 1)
    assert [b.forward for b in blocks] == [[1], [2], [3], [4], []]
    assert [b.backward for b in blocks] == [[], [0], [1], [2], [3]]

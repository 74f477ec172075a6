"""One launch moving accepted tree nodes' K/V in every cache buffer, against a slot-by-slot loop."""

import pytest
import torch

from fastmedusa.ops.kv_move import cache_table, move_kv, move_kv_reference


def _caches(n, rows, kv_heads, slots, hd, dtype, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, kv_heads, slots, hd, generator=gen).to(device, dtype) for _ in range(n)]


def _paths(bsz, depth, slots, seed=0):
    """Per row: accepted path nodes at increasing tree slots from a random current slot, moved to cur..cur+D-1
    (a node may move onto a slot that a later node is read from: reads come first)."""
    gen = torch.Generator().manual_seed(seed)
    src, dst = torch.zeros(bsz, depth, dtype=torch.long), torch.zeros(bsz, depth, dtype=torch.long)
    for b in range(bsz):
        cur = int(torch.randint(0, slots - 3 * depth, (1,), generator=gen))
        nodes = torch.sort(torch.randperm(3 * depth, generator=gen)[:depth]).values
        nodes[0] = 0
        src[b], dst[b] = cur + nodes, cur + torch.arange(depth)
    return src, dst


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("n, rows, bsz, kv_heads, slots, hd, depth", [(6, 1, 1, 3, 64, 64, 5), (4, 4, 3, 2, 50, 24, 3), (2, 2, 2, 1, 40, 16, 1)])
def test_matches_slot_by_slot_copy(n, rows, bsz, kv_heads, slots, hd, depth, dtype):
    caches = _caches(n, rows, kv_heads, slots, hd, dtype, seed=n + hd)
    src, dst = _paths(bsz, depth, slots, seed=depth)
    expected = move_kv_reference(caches, src, dst)
    move_kv(caches, src, dst)
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)


def test_overlapping_slots_read_before_written():
    caches = _caches(2, 1, 1, 8, 4, torch.float32)
    src, dst = torch.tensor([[2, 3, 5]]), torch.tensor([[1, 2, 3]])  # slot 2 and 3 are read, then written
    before = [c.clone() for c in caches]
    move_kv(caches, src, dst)
    for got, old in zip(caches, before):
        assert torch.equal(got[0, :, 1:4], old[0, :, [2, 3, 5]])
        assert torch.equal(got[0, :, [0, 4, 5, 6, 7]], old[0, :, [0, 4, 5, 6, 7]])


def test_compiled_call_writes_the_buffers_in_place():
    """Under torch.compile the op mutates the module's own buffers (no copies of the caches)."""

    class Caches(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for i, c in enumerate(_caches(3, 2, 2, 16, 8, torch.float32, seed=4)):
                self.register_buffer(f"c{i}", c)

        def forward(self, x, src, dst):
            move_kv([self.c0, self.c1, self.c2], src, dst)
            return x + 1

    module = Caches()
    src, dst = torch.tensor([[3, 5, 9], [4, 6, 7]]), torch.tensor([[3, 4, 5], [4, 5, 6]])
    expected = move_kv_reference([module.c0, module.c1, module.c2], src, dst)
    addresses = [c.data_ptr() for c in (module.c0, module.c1, module.c2)]
    torch.compile(module, fullgraph=True)(torch.zeros(2), src, dst)
    for got, want, address in zip((module.c0, module.c1, module.c2), expected, addresses):
        assert torch.equal(got, want) and got.data_ptr() == address


def test_address_table_is_built_once_per_set_of_buffers():
    caches = _caches(3, 1, 1, 8, 4, torch.float32)
    table = cache_table(caches)
    assert cache_table(caches) is table and table.tolist() == [c.data_ptr() for c in caches]
    assert cache_table(caches[:2]) is not table


def test_bad_inputs():
    caches = _caches(2, 2, 1, 8, 4, torch.float32)
    with pytest.raises(ValueError, match="one shape"):
        move_kv(caches, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="cache rows"):
        move_kv(caches, torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="share shape"):
        move_kv([caches[0], caches[1][:, :, :4]], torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="supports"):
        move_kv([c.double() for c in caches], torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_matches_slot_by_slot_copy_on_gpu(dtype):
    caches = _caches(60, 16, 3, 512, 64, dtype, device="cuda")
    src, dst = _paths(16, 6, 512)
    expected = move_kv_reference(caches, src.cuda(), dst.cuda())
    move_kv(caches, src.cuda(), dst.cuda())
    for got, want in zip(caches, expected):
        assert torch.equal(got, want)

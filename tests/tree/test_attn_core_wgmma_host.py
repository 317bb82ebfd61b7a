"""The sm_90a wgmma variant of the attention core (attn_core_wgmma_kernel, attn_core_sm90.cuh) on the
CPU: its shared-memory layout (gmma_off), the wgmma accumulator and A-fragment maps and the P ->
A-fragment repacking (attn_core.h: wg_acc_row / wg_acc_col, wg_a_row / wg_a_col, wg_pa_src), run by
torch.ops.tokenkernels._attn_core_wgmma_fragments on one 64-row CTA tile. The kernel checks at compile
time that these maps are CuTe's (SW128 layouts, MMA_Traits CLayout / ALayout); here they are checked
to compute the tile, and against the layout CuTe's SM90 traits spell out."""
from __future__ import annotations

import pytest
import torch

import tokenkernels  # noqa: F401  (loads the ops)

OPS = torch.ops.tokenkernels


def cute_c_layout(t, i):
    """CuTe's SM90 64xN fp32 CLayout ((4,8,4),(2,2,N/8)):((128,1,16),(64,8,512)) -> (m, n)."""
    t0, t1, t2 = t % 4, (t // 4) % 8, t // 32
    v0, v1, v2 = i % 2, (i // 2) % 2, i // 4
    idx = 128 * t0 + t1 + 16 * t2 + 64 * v0 + 8 * v1 + 512 * v2
    return idx % 64, idx // 64


def cute_a_layout(t, v):
    """CuTe's SM90 64x16 A register layout ((4,8,4),(2,2,2)):((128,1,16),(64,8,512)) -> (m, k)."""
    return cute_c_layout(t, v)


@pytest.mark.parametrize("D", [64, 128])
def test_wgmma_tile_computes_attention_products(D):
    """S = Q K^T and O = S V come out element for element through the kernel's layout, maps and
    repacking (a wrong thread -> row / column map, or a wrong repack index, scrambles them)."""
    g = torch.Generator().manual_seed(D)
    q, k, v = (torch.randn(64, D, generator=g) for _ in range(3))
    S, O, _, _, _ = OPS._attn_core_wgmma_fragments(q, k, v)
    torch.testing.assert_close(S, q @ k.T, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(O, S @ v, atol=1e-3, rtol=1e-5)


def test_wgmma_tile_moves_single_elements():
    """A distinct value per element, exact in fp32: the model is not the identity."""
    q = torch.zeros(64, 64)
    q[37, 21] = 1.0
    k = torch.zeros(64, 64)
    k[50, 21] = 2.0
    v = torch.arange(64 * 64, dtype=torch.float32).view(64, 64)
    S, O, _, _, _ = OPS._attn_core_wgmma_fragments(q, k, v)
    want = torch.zeros(64, 64)
    want[37, 50] = 2.0
    assert torch.equal(S, want)
    assert torch.equal(O[37], 2.0 * v[50]) and (O[torch.arange(64) != 37] == 0).all()


def test_wgmma_maps_cover_tiles_once_and_match_cute():
    _, _, acc, a, _ = OPS._attn_core_wgmma_fragments(torch.zeros(64, 64), torch.zeros(64, 64), torch.zeros(64, 64))
    flat = acc[..., 0] * 64 + acc[..., 1]
    assert torch.equal(flat.flatten().sort().values, torch.arange(64 * 64))
    flat_a = a[..., 0] * 16 + a[..., 1]
    assert torch.equal(flat_a.flatten().sort().values, torch.arange(64 * 16))
    for t in range(128):
        for i in range(32):
            assert tuple(acc[t, i].tolist()) == cute_c_layout(t, i)
        for vv in range(8):
            assert tuple(a[t, vv].tolist()) == cute_a_layout(t, vv)
    # the 4 lanes of a quad share their two rows (the kernel's max / sum shuffles xor 1, 2)
    for t in range(128):
        for x in (1, 2):
            assert torch.equal(acc[t, :, 0], acc[t ^ x, :, 0])


def test_wgmma_repack_is_thread_local():
    """P needs no shuffle: each A value of k-step ks is an S accumulator value of the SAME thread
    at (row, 16 ks + k) -- what wg_pa_src picks, checked through the returned maps."""
    _, _, acc, a, _ = OPS._attn_core_wgmma_fragments(torch.zeros(64, 64), torch.zeros(64, 64), torch.zeros(64, 64))
    # invert: (t, row, col) -> S value index of thread t
    where = {(t, int(acc[t, i, 0]), int(acc[t, i, 1])): i for t in range(128) for i in range(32)}
    for ks in range(4):
        for t in range(128):
            for vv in range(8):
                key = (t, int(a[t, vv, 0]), 16 * ks + int(a[t, vv, 1]))
                assert key in where   # the value lives in this thread
                # and it is the one wg_pa_src names: (2 ks + v / 4) * 4 + v % 4
                assert where[key] == (2 * ks + vv // 4) * 4 + vv % 4


@pytest.mark.parametrize("D", [64, 128])
def test_wgmma_smem_layout_is_the_hardware_swizzle(D):
    """gmma_off (the kernel's cp.async / Q-store destinations) is CuTe's SW128 layout as bytes:
    Swizzle<3,4,3> (byte bits 4-6 ^= bits 7-9) of the unswizzled offset (D / 64 blocks of 64 rows x
    128 bytes); a bijection; the 8 rows of an 8 x 8 core matrix in 8 different 16-byte bank groups."""
    z = torch.zeros(64, D)
    off = OPS._attn_core_wgmma_fragments(z, z, z)[4]
    assert off.shape == (64, D // 8)

    def cute_off(r, c):
        plain = 2 * ((c // 8) * 4096 + r * 64 + (c % 8) * 8)   # bytes
        return (plain ^ (((plain >> 7) & 7) << 4)) // 2

    for r in range(64):
        for c in range(D // 8):
            assert int(off[r, c]) == cute_off(r, c)
    assert len(set(off.flatten().tolist())) == off.numel() and int(off.max()) < 64 * D and int(off.min()) >= 0
    for r0 in range(0, 64, 8):
        for c in range(D // 8):
            assert len({(int(off[r0 + j, c]) * 2 // 16) % 8 for j in range(8)}) == 8

"""Builders of KV-cache test cases for both layouts (contiguous / paged), GQA, varlen, strides."""
from dataclasses import dataclass
from typing import List, Optional

import torch


@dataclass
class Case:
    q: torch.Tensor              # (B, H_q, D)
    k: torch.Tensor              # cache, contiguous (B, N, H_kv, D) or paged (P, S, H_kv, D)
    v: torch.Tensor
    seq_lens: torch.Tensor       # (B,) int32
    block_table: Optional[torch.Tensor]

    @property
    def kw(self):
        return dict(block_table=self.block_table)


def make_case(seq_lens: List[int], *, H_kv=2, G=4, D=64, dtype=torch.float32, page_size=None,
              n_max=None, strided=False, device="cpu", seed=0, C=None) -> Case:
    """Random case. page_size None -> contiguous (B, n_max, H_kv, D); otherwise a paged cache with
    a shuffled block table and a few spare pages. strided: the cache is a transposed view of a
    (B, H_kv, N, D) (HF) or (P, H_kv, S, D) tensor. C: also a (B, C, H_q, D) chunk of queries
    (returned as case.q)."""
    g = torch.Generator().manual_seed(seed)
    B = len(seq_lens)
    N = n_max or max(max(seq_lens), 1)
    H_q = H_kv * G
    qshape = (B, H_q, D) if C is None else (B, C, H_q, D)
    q = torch.randn(qshape, generator=g)
    sl = torch.tensor(seq_lens, dtype=torch.int32)
    bt = None
    if page_size is None:
        shape = (B, H_kv, N, D) if strided else (B, N, H_kv, D)
    else:
        pages_per = (N + page_size - 1) // page_size
        P = B * pages_per + 3
        bt = torch.randperm(P, generator=g)[:B * pages_per].view(B, pages_per).to(torch.int32)
        shape = (P, H_kv, page_size, D) if strided else (P, page_size, H_kv, D)
    k = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    if strided:
        k, v = k.transpose(1, 2), v.transpose(1, 2)
    cast = lambda t: t.to(dtype).to(device)  # noqa: E731
    return Case(cast(q), cast(k), cast(v), sl.to(device), None if bt is None else bt.to(device))


def f64(t: torch.Tensor) -> torch.Tensor:
    return t.double().cpu()


def cpu(t):
    return None if t is None else t.cpu()

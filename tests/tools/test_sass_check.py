"""tools/sass_check.py: the expectation grammar, the nvdisasm / res-usage parsers and the rules,
on small recorded texts (the real check runs in `make sass-check` / `make test` where nvcc is)."""
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import sass_check as sc  # noqa: E402

SASS = """
//--------------------- .text._Z6kernAv --------------------------
	.section	.text._Z6kernAv,"ax",@progbits
_Z6kernAv:
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   LDGSTS.E.BYPASS.LTC128B.128 [R2], desc[UR4][R4.64] ;
        /*0020*/              @!P0 HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0040*/                   EXIT ;
//--------------------- .text._Z6kernBv --------------------------
	.section	.text._Z6kernBv,"ax",@progbits
_Z6kernBv:
        /*0000*/                   STL [R1], R2 ;
        /*0010*/               @P1 LDL R3, [R1] ;
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   EXIT ;
"""
RES = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernAv:
  REG:96 STACK:0 SHARED:8192 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function _Z6kernBv:
  REG:40 STACK:16 SHARED:0 LOCAL:0 CONSTANT[0]:552 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def kernels(arch="sm_80"):
    funcs, res = sc.parse_sass(SASS), sc.parse_res_usage(RES)
    names = {"_Z6kernAv": "kernA()", "_Z6kernBv": "kernB()"}
    return [sc.Kernel(m, names[m], arch, "x.o", ops, res[m]["REG"], res[m]["STACK"], res[m]["SHARED"],
                      res[m]["LOCAL"]) for m, ops in funcs.items()]


def test_parse_sass_counts_opcodes_without_predicates():
    f = sc.parse_sass(SASS)
    assert f["_Z6kernAv"]["HMMA.16816.F32.BF16"] == 2
    assert f["_Z6kernAv"]["LDGSTS.E.BYPASS.LTC128B.128"] == 1
    assert f["_Z6kernBv"] == Counter({"STL": 1, "LDL": 1, "LDG.E.128": 1, "EXIT": 1})


def test_parse_res_usage():
    r = sc.parse_res_usage(RES)
    assert r["_Z6kernAv"]["REG"] == 96 and r["_Z6kernAv"]["SHARED"] == 8192
    assert r["_Z6kernBv"]["STACK"] == 16


def test_expectations_grammar():
    text = "x\n// sass: kernA sm_80 HMMA LDGSTS !LDL !STL stack==0 regs<=128 smem<=8192\n  // sass: kernB sm_90a LDG.E.128\n"
    e = sc.parse_expectations(text, "f.cu")
    assert [(x.kernel, x.arch, x.where) for x in e] == [("kernA", "sm_80", "f.cu:2"), ("kernB", "sm_90a", "f.cu:3")]
    assert e[0].tokens[-2:] == ["regs<=128", "smem<=8192"]
    for bad in ("// sass: k sm_70 HMMA", "// sass: k sm_80 hmma", "// sass: k sm_80 regs<128", "// sass: k"):
        with pytest.raises(ValueError):
            sc.parse_expectations(bad, "f.cu")


def test_rules_pass_and_fail():
    ks = kernels()
    ok = sc.Expectation("kernA", "sm_80", ["HMMA", "LDGSTS", "!LDL", "!STL", "stack==0", "regs<=96", "smem<=8192"], "f:1")
    assert sc.evaluate(ok, ks) == []
    bad = sc.Expectation("kernB", "sm_80", ["HMMA", "!LDL", "!STL", "stack==0", "regs<=32", "LDG.E.128"], "f:2")
    errs = sc.evaluate(bad, ks)
    assert len(errs) == 5 and any("no HMMA" in e for e in errs) and any("1 LDL" in e for e in errs)
    assert any("16 B stack" in e for e in errs) and any("40 registers" in e for e in errs)
    assert any("static shared > 4096" in e for e in sc.evaluate(sc.Expectation("kernA", "sm_80", ["smem<=4096"], "f"), ks))


def test_no_match_and_other_arch_fail():
    ks = kernels("sm_80")
    assert "no sm_90a kernel matches" in sc.evaluate(sc.Expectation("kernA", "sm_90a", ["HMMA"], "f:3"), ks)[0]
    assert "no sm_80 kernel matches" in sc.evaluate(sc.Expectation("kernZ", "sm_80", ["HMMA"], "f:4"), ks)[0]


def test_table_lists_declared_kernels_only():
    ks = kernels()
    t = sc.table(ks, [sc.Expectation("kernA", "sm_80", ["HMMA"], "f")])
    assert "kernA()" in t and "kernB()" not in t
    assert "kernB()" in sc.table(ks)

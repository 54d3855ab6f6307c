"""``minift kernels check``: a table of every kernel on every path, and a failing exit status when
a kernel and its reference disagree."""

from minift.cli import main
from minift.cuda import check as kernels_check
from minift.cuda import reference as ref


def test_kernels_check_prints_every_kernel_and_passes(capsys):
    assert main(["kernels", "check"]) == 0
    table = capsys.readouterr().out
    for name in ("lora_shrink_v1", "lora_shrink_v2", "lora_expand", "lora_fused", "lora_backward", "bgmv",
                 "nf4_dequant (float32)", "nf4_dequant_nested (float16)", "nf4_gemv"):
        assert name in table
    assert "emulator" in table and " NO" not in table


def test_kernels_check_fails_when_a_kernel_disagrees_with_its_reference(capsys, monkeypatch):
    monkeypatch.setattr(kernels_check, "LORA_SHAPES", [(3, 8, 5, 2)])
    monkeypatch.setattr(kernels_check, "BGMV_SHAPES", [(2, 8, 5, 2, 2)])
    monkeypatch.setattr(kernels_check, "NF4_SHAPES", [(64, 32)])
    monkeypatch.setattr(ref, "lora_shrink", lambda x, A: x.astype(float) @ A.T.astype(float) + 1e-3)
    assert main(["kernels", "check"]) == 1
    captured = capsys.readouterr()
    assert "lora_shrink_v2 on emulator" in captured.err

import pytest
import torch

from mixprec import PRESETS
from mixprec.compute import autocast
from mixprec.hardware import (
    HardwareReport,
    auto_policy,
    choose_backend,
    measure_gemm,
    probe,
    recommend,
    tensor_core_formats,
)


def fake_cuda(name, capability):
    return HardwareReport(
        device="cuda:0",
        kind="cuda",
        name=name,
        compute_capability=capability,
        tensor_core_formats=tensor_core_formats("cuda", capability, frozenset()),
    )


def fake_cpu(*flags):
    flags = frozenset(flags)
    return HardwareReport(
        "cpu",
        "cpu",
        "Test CPU",
        cpu_flags=flags,
        tensor_core_formats=tensor_core_formats("cpu", None, flags),
    )


@pytest.mark.parametrize(
    ("capability", "formats"),
    [
        ((6, 1), set()),
        ((7, 0), {"fp16"}),
        ((7, 5), {"fp16"}),
        ((8, 0), {"fp16", "bf16", "tf32"}),
        ((8, 9), {"fp16", "bf16", "tf32", "fp8_e4m3", "fp8_e5m2"}),
        ((9, 0), {"fp16", "bf16", "tf32", "fp8_e4m3", "fp8_e5m2"}),
    ],
)
def test_cuda_tensor_core_formats_by_capability(capability, formats):
    assert tensor_core_formats("cuda", capability, frozenset()) == formats


def test_cpu_formats_by_flags():
    assert fake_cpu("avx2").tensor_core_formats == set()
    assert fake_cpu("avx512f", "avx512_bf16").tensor_core_formats == {"bf16"}
    assert fake_cpu("amx_bf16", "amx_fp16").tensor_core_formats == {"bf16", "fp16"}
    # AVX512-FP16 without AMX-FP16: torch's fp16 GEMMs are no faster than fp32 there
    sapphire = fake_cpu("avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile")
    assert sapphire.tensor_core_formats == {"bf16"}


def test_recommendations_and_reasons():
    h100 = recommend(fake_cuda("NVIDIA H100", (9, 0)))
    assert h100.policy == PRESETS["bf16-mixed"] and h100.backend == "native"
    assert "bf16-mixed on NVIDIA H100 (sm_90)" in h100.reason and "no loss scaling" in h100.reason
    v100 = recommend(fake_cuda("Tesla V100", (7, 0)))
    assert v100.policy == PRESETS["fp16-mixed"] and "loss scaling" in v100.reason
    pascal = recommend(fake_cuda("GTX 1080", (6, 1)))
    assert pascal.backend == "emulated"
    sapphire = recommend(fake_cpu("avx512f", "amx_bf16"))
    assert sapphire.backend == "native" and sapphire.policy == PRESETS["bf16-mixed"]
    assert "AMX-BF16 instructions" in sapphire.reason and "tensor cores" not in sapphire.reason
    zen4 = recommend(fake_cpu("avx512f", "avx512_bf16"))
    assert "AVX512-BF16 instructions" in zen4.reason and "tensor cores" not in zen4.reason
    assert "tensor cores" in h100.reason
    avx2 = recommend(fake_cpu("avx2"))
    assert avx2.backend == "emulated" and "no 16-bit GEMM units" in avx2.reason
    assert "AVX2" in avx2.reason


def test_choose_backend_on_faked_reports():
    assert choose_backend("cpu", torch.bfloat16, "auto", fake_cpu("avx2"))[0] == "emulated"
    assert choose_backend("cpu", torch.bfloat16, "auto", fake_cpu("amx_bf16"))[0] == "native"
    assert choose_backend("cpu", torch.float16, "auto", fake_cpu("amx_bf16"))[0] == "emulated"
    assert choose_backend("cpu", torch.float16, "native", fake_cpu("avx2")) == (
        "native",
        "requested",
    )


def test_probe_this_cpu():
    report = probe("cpu", measure=False)
    assert report.kind == "cpu" and report.compute_capability is None
    assert report.tensor_core_formats == tensor_core_formats("cpu", None, report.cpu_flags)
    assert probe("cpu", measure=False) is report  # cached
    assert report.describe()["kind"] == "cpu"


def test_measure_gemm_reports_every_dtype():
    gflops = measure_gemm("cpu", size=32, repeats=1)
    assert set(gflops) == {"fp32", "bf16", "fp16"} and all(v > 0 for v in gflops.values())


def test_policy_auto_agrees_with_the_probe_and_autocast():
    choice = auto_policy("cpu")
    report = probe("cpu")
    assert choice == recommend(report)
    assert autocast("cpu", dtype=choice.policy.compute.dtype).backend == choice.backend
    assert str(choice).startswith(str(choice.policy))


def test_probing_cuda_without_cuda_says_so():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(RuntimeError, match=r"cannot probe 'cuda': CUDA is not available"):
        probe("cuda")


def test_the_backend_reason_names_the_units():
    backend, reason = choose_backend("cpu", torch.bfloat16, "auto", fake_cpu("avx512_bf16"))
    assert backend == "native" and "AVX512-BF16 instructions" in reason
    backend, reason = choose_backend("cuda", torch.float16, "auto", fake_cuda("A100", (8, 0)))
    assert backend == "native" and "tensor cores" in reason


def test_policies_sit_below_hardware():
    # the layering: hardware imports policy, never the other way round (no import cycle)
    import ast
    import inspect

    import mixprec.policy

    tree = ast.parse(inspect.getsource(mixprec.policy))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.startswith(("mixprec.hardware", "mixprec.compute")) for m in imported)

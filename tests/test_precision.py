"""``llm_dtype`` / ``llm_quantization`` ``auto`` follow the hardware (detection monkeypatched: every case runs on
any machine), autocast and the gradient scaler follow the dtype, the 8-bit cast warning shows once."""
import logging

import pytest
import torch

from recbole_llm.llm import last_hidden_states, load_llm, loading, precision
from recbole_llm.llm.precision import (autocast_context, choose_dtype, choose_quantization, grad_scaler,
                                       needs_grad_scaler)
from tests.test_llm import llm_config

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
GIB = 1024 ** 3


def fake_cpu(monkeypatch, amx, avx512_bf16):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)


@pytest.mark.parametrize("amx, avx512_bf16, dtype, reason", [
    (True, False, torch.bfloat16, "this CPU has native bf16: AMX"),
    (False, True, torch.bfloat16, "this CPU has native bf16: AVX512-BF16"),
    (True, True, torch.bfloat16, "this CPU has native bf16: AMX, AVX512-BF16"),
    (False, False, torch.float32, "this CPU has no native bf16"),
])
def test_auto_dtype_on_cpu_is_bf16_only_where_native(monkeypatch, amx, avx512_bf16, dtype, reason):
    fake_cpu(monkeypatch, amx, avx512_bf16)
    assert choose_dtype("auto", CPU) == (dtype, reason)


@pytest.mark.parametrize("cap, dtype", [("AVX2", torch.float32), ("avx512_core", torch.float32),
                                        ("AVX512_CORE_BF16", torch.bfloat16), ("ALL", torch.bfloat16)])
def test_a_onednn_isa_cap_below_bf16_means_fp32(monkeypatch, cap, dtype):
    fake_cpu(monkeypatch, True, True)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", cap)
    chosen, reason = choose_dtype("auto", CPU)
    assert chosen == dtype
    assert (f"ONEDNN_MAX_CPU_ISA={cap.upper()}" in reason) == (dtype == torch.float32)


@pytest.mark.parametrize("bf16, dtype", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_is_bf16_where_supported_else_fp16(monkeypatch, bf16, dtype):
    asked = {}

    def is_bf16_supported(including_emulation=True):
        asked["including_emulation"] = including_emulation
        return bf16

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    fake_cpu(monkeypatch, True, True)  # the CPU's features do not matter on CUDA
    assert choose_dtype("auto", CUDA)[0] == dtype
    assert asked == {"including_emulation": False}  # emulated bf16 is the slow case, not "supported"


def test_an_explicit_dtype_wins_over_the_hardware(monkeypatch):
    fake_cpu(monkeypatch, False, False)
    assert choose_dtype("bf16", CPU) == (torch.bfloat16, "set by llm_dtype")
    assert choose_dtype("float32", CUDA) == (torch.float32, "set by llm_dtype")


def test_the_chosen_dtype_is_logged_and_loaded(monkeypatch, caplog):
    fake_cpu(monkeypatch, False, False)
    with caplog.at_level(logging.INFO, logger="recbole_llm.llm.loading"):
        llm, _ = load_llm(llm_config())
    assert "llm dtype: fp32 (this CPU has no native bf16)" in caplog.text
    assert "llm quantization: none (auto quantizes only on CUDA, this run is on cpu)" in caplog.text
    assert {p.dtype for p in llm.parameters()} == {torch.float32}


def fake_gpu(monkeypatch, free_gib, total_gib=80):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (int(free_gib * GIB), int(total_gib * GIB)))


@pytest.mark.parametrize("free_gib, expected", [(80, "none"), (17, "none"), (15, "4bit"), (8, "4bit")])
def test_auto_quantization_on_cuda_only_when_the_model_does_not_fit(monkeypatch, free_gib, expected):
    # A Llama-2-7B-shaped model (6.74 B parameters): 12.6 GiB in bf16, 15.7 GiB with room for activations.
    monkeypatch.setattr(precision, "count_parameters", lambda folder: 6_738_415_616)
    fake_gpu(monkeypatch, free_gib)
    quantization, reason = choose_quantization("auto", CUDA, "llama-2-7b", torch.bfloat16)
    assert quantization == expected
    assert "bf16 weights 12.6 GiB + activations need 15.7 GiB" in reason and f"{free_gib:.1f} GiB of 80.0 GiB free" in reason


def test_auto_quantization_counts_the_checkpoints_parameters(monkeypatch):
    """The estimate comes from the folder's config (meta device, no weights read); at least 2 GiB stay free."""
    folder = loading.tiny_random_folder()
    llm, _ = load_llm(llm_config(llm_dtype="fp32"))
    assert precision.count_parameters(folder) == sum(p.numel() for p in llm.parameters())
    fake_gpu(monkeypatch, free_gib=2.1)
    assert choose_quantization("auto", CUDA, folder, torch.bfloat16)[0] == "none"
    fake_gpu(monkeypatch, free_gib=2)
    assert choose_quantization("auto", CUDA, folder, torch.bfloat16)[0] == "4bit"


def test_never_quantized_on_cpu_unless_asked(monkeypatch):
    monkeypatch.setattr(precision, "count_parameters", lambda folder: pytest.fail("no estimate needed on CPU"))
    assert choose_quantization("auto", CPU, "any")[0] == "none"
    assert choose_quantization("4bit", CPU, "any") == ("4bit", "set by llm_quantization")


@pytest.mark.parametrize("dtype, on", [(torch.float32, False), (torch.bfloat16, True), (torch.float16, True)])
def test_autocast_is_off_in_fp32(dtype, on):
    with torch.autocast("cpu", dtype=torch.bfloat16):  # an outer autocast is switched off too
        with autocast_context(CPU, dtype, enabled=True):
            assert torch.is_autocast_enabled("cpu") == on
            if on:
                assert torch.get_autocast_dtype("cpu") == dtype
    with autocast_context(CPU, torch.bfloat16, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("device, dtype, needed", [
    (CUDA, torch.float16, True), (CUDA, torch.bfloat16, False), (CUDA, torch.float32, False),
    (CPU, torch.float16, False), (CPU, torch.bfloat16, False), ("cpu", torch.float32, False),
])
def test_a_grad_scaler_only_for_fp16_on_cuda(device, dtype, needed):
    assert needs_grad_scaler(device, dtype) == needed
    if torch.device(device).type == "cpu":
        scaler = grad_scaler(device, dtype)
        assert not scaler.is_enabled()
        loss = torch.ones((), requires_grad=True)
        assert scaler.scale(loss) is loss  # disabled: every call passes through


def test_the_8bit_cast_warning_shows_at_most_once(caplog):
    llm, _ = load_llm(llm_config(llm_quantization="8bit", llm_dtype="bf16"))  # bf16 inputs: cast on every matmul
    input_ids = torch.tensor([[5, 6, 7, 8]])
    with caplog.at_level(logging.WARNING):
        for _ in range(3):
            last_hidden_states(llm, input_ids, torch.ones_like(input_ids))
    casts = [r for r in caplog.records if "MatMul8bitLt: inputs will be cast" in r.getMessage()]
    assert len(casts) <= 1 and loading.BNB_CAST_WARNING.seen  # seen: the 8-bit matmul did emit it

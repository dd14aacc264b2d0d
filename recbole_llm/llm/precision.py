"""Which dtype and quantization the LLM runs in, chosen from what the hardware really does.

``llm_dtype: auto``
  CPU   bf16 only where the CPU computes it natively (AMX or AVX512-BF16) and oneDNN may use it (an
        ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 leaves torch's bf16 matmuls emulated); elsewhere bf16
        is emulated and several times slower than fp32 (measured: 85 vs 372 tok/s for SmolLM2 on an AVX2-only
        EPYC), so fp32.
  CUDA  bf16 where the GPU supports it natively, else fp16 (trained with a gradient scaler).
``llm_quantization: auto``
  CUDA  4-bit only when the unquantized model would not fit the GPU's free memory with room for activations
        (4-bit makes every LLM stage ~1.7x slower, to save memory a large card does not need);
  CPU   never.

``autocast_context`` and ``grad_scaler`` are what a training or scoring loop needs to honour the choice:
autocast only in bf16/fp16, a gradient scaler only for fp16 on CUDA.
"""
import os

import torch

from recbole_llm.errors import ConfigError

DTYPES = {"auto": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
          "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
QUANTIZATIONS = ("auto", "none", "4bit", "8bit")
# Room left beside the weights for activations, the KV cache, optimizer state and CUDA's own workspace.
ACTIVATION_HEADROOM = 0.25  # of the weights' size
ACTIVATION_HEADROOM_MIN = 2 * 1024 ** 3  # bytes
# oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) below its bf16 kernels: torch's bf16 matmuls are then emulated
ONEDNN_CAPS_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX512_CORE", "AVX512_CORE_VNNI"}


def _detected(name):
    check = getattr(torch.cpu, name, None)
    return bool(check()) if check is not None else False


def cpu_bf16_features():
    """Native bf16 features torch detects on this CPU: {'AMX': bool, 'AVX512-BF16': bool}."""
    return {"AMX": _detected("_is_amx_tile_supported"), "AVX512-BF16": _detected("_is_avx512_bf16_supported")}


def choose_dtype(name, device):
    """``(torch dtype, reason)`` for ``llm_dtype=name`` on ``device``; ``auto`` follows the hardware."""
    name = str(name or "auto").lower()
    if name not in DTYPES:
        raise ConfigError(f"llm_dtype: unknown value '{name}' (choose from {', '.join(DTYPES)})")
    if DTYPES[name] is not None:
        return DTYPES[name], "set by llm_dtype"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return torch.bfloat16, "this GPU supports bf16"
        return torch.float16, "this GPU has no native bf16: fp16 with a gradient scaler"
    if device.type == "cpu":
        native = [feature for feature, present in cpu_bf16_features().items() if present]
        cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper()
        if native and cap in ONEDNN_CAPS_WITHOUT_BF16:
            return torch.float32, f"ONEDNN_MAX_CPU_ISA={cap} keeps this CPU's native bf16 ({', '.join(native)}) unused"
        if native:
            return torch.bfloat16, f"this CPU has native bf16: {', '.join(native)}"
        return torch.float32, "this CPU has no native bf16"
    return torch.float32, f"no bf16 detection for device type '{device.type}'"


def count_parameters(folder):
    """Parameters of the causal LM in ``folder``, from its config alone (built on the meta device, no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - any failure here means a broken config.json
        raise ConfigError(f"llm_path: cannot read the model config in '{folder}': {type(e).__name__}: {e}") from e
    return sum(p.numel() for p in model.parameters())


def _gib(n_bytes):
    return f"{n_bytes / 1024 ** 3:.1f} GiB"


def choose_quantization(name, device, folder=None, dtype=torch.bfloat16):
    """``(quantization, reason)`` for ``llm_quantization=name``; ``auto`` quantizes (4-bit) only on CUDA and only
    when the model in ``dtype`` would not fit the device's free memory with room for activations."""
    name = "none" if name in (None, False) else str(name).lower()
    if name not in QUANTIZATIONS:
        raise ConfigError(f"llm_quantization: unknown value '{name}' (choose from {', '.join(QUANTIZATIONS)})")
    if name != "auto":
        return name, "set by llm_quantization"
    if device.type != "cuda":
        return "none", f"auto quantizes only on CUDA, this run is on {device.type}"
    weights = count_parameters(folder) * torch.tensor([], dtype=dtype).element_size()
    needed = weights + max(ACTIVATION_HEADROOM * weights, ACTIVATION_HEADROOM_MIN)
    free, total = torch.cuda.mem_get_info(device)
    fit = f"{DTYPE_NAMES.get(dtype, dtype)} weights {_gib(weights)} + activations need {_gib(needed)}, " \
          f"{_gib(free)} of {_gib(total)} free on {device}"
    return ("none", fit) if needed <= free else ("4bit", fit)


def needs_grad_scaler(device, dtype):
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (and CPU fp16 is not scaled)."""
    return torch.device(device).type == "cuda" and dtype == torch.float16


def grad_scaler(device, dtype):
    """A ``torch.amp.GradScaler``, enabled only when ``needs_grad_scaler``: disabled, each call passes through."""
    device = torch.device(device)
    return torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, dtype))


def autocast_context(device, dtype, enabled=True):
    """Autocast in ``dtype`` when ``enabled`` and ``dtype`` is bf16/fp16; otherwise autocast is off (fp32)."""
    device = torch.device(device)
    on = bool(enabled) and dtype in (torch.bfloat16, torch.float16)
    return torch.autocast(device_type=device.type, dtype=dtype if on else None, enabled=on)


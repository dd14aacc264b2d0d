"""What only a CUDA device can show: auto dtype and quantization on a real card, 4-bit loading through
bitsandbytes, LoRA with gradient checkpointing, a whole LLM model run on the GPU and its checkpoint read back on
the CPU. Skipped without CUDA; ``bench/device_check.py`` runs this file (and the nccl case of
``test_distributed.py``) on a GPU machine."""
import glob
import json
import os
import sys

import pytest
import torch

from recbole_llm.llm import last_hidden_states, load_llm
from recbole_llm.llm.precision import choose_dtype, choose_quantization
from tests.conftest import tiny_config

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda", 0)


def llm_config(**overrides):
    config = {"llm_path": "tiny-random", "llm_dtype": "auto", "llm_quantization": "none", "llm_cache_dir": None,
              "llm_gradient_checkpointing": False, "lora_r": 0, "lora_alpha": 16, "lora_dropout": 0.0,
              "lora_target_modules": ["q_proj", "v_proj"], "device": CUDA}
    config.update(overrides)
    return config


def _batch(vocab=1000, batch=4, length=24, hidden=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(10, vocab, (batch, length), generator=g).to(CUDA)
    attention = torch.ones_like(input_ids)
    placeholder = torch.zeros_like(input_ids, dtype=torch.bool)
    placeholder[:, 2:5] = True
    vectors = torch.randn(batch * 3, hidden, generator=g).to(CUDA).requires_grad_(True)
    return input_ids, attention, placeholder, vectors


def _huge_folder(path):
    """A config-only folder of a Llama far larger than any one GPU (weights never built: meta device)."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 16384,
        "intermediate_size": 53248, "num_hidden_layers": 126, "num_attention_heads": 128,
        "num_key_value_heads": 8}))
    return str(path)


def test_auto_dtype_is_native_on_this_card():
    dtype, reason = choose_dtype("auto", CUDA)
    expected = torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    assert dtype == expected, reason


def test_auto_quantization_reads_this_cards_free_memory(tmp_path):
    from recbole_llm.llm.loading import tiny_random_folder

    quantization, reason = choose_quantization("auto", CUDA, tiny_random_folder(), torch.bfloat16)
    assert quantization == "none" and "free on cuda" in reason, reason
    quantization, reason = choose_quantization("auto", CUDA, _huge_folder(tmp_path / "huge"), torch.bfloat16)
    assert quantization == "4bit", reason


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_lora_trains_on_cuda(bits):
    pytest.importorskip("bitsandbytes")
    llm, _ = load_llm(llm_config(llm_quantization=bits, lora_r=4))
    assert getattr(llm, f"is_loaded_in_{bits[0]}bit", False)
    assert all(p.device.type == CUDA.type for p in llm.parameters())
    input_ids, attention, placeholder, vectors = _batch(hidden=llm.config.hidden_size)
    hidden = last_hidden_states(llm, input_ids, attention, placeholder, vectors)
    hidden[:, -1].float().pow(2).mean().backward()
    lora = [p for n, p in llm.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    assert vectors.grad is not None and torch.isfinite(vectors.grad).all()


def test_lora_with_gradient_checkpointing_matches_without_on_cuda():
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        llm, _ = load_llm(llm_config(llm_dtype="fp32", lora_r=4, llm_gradient_checkpointing=checkpointing))
        llm.train()  # checkpointing is active in training mode only
        input_ids, attention, placeholder, vectors = _batch(hidden=llm.config.hidden_size)
        hidden = last_hidden_states(llm, input_ids, attention, placeholder, vectors)
        loss = hidden[:, -1].float().pow(2).mean()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in llm.named_parameters() if "lora_" in n}
        results.append((loss.detach(), grads, vectors.grad.detach().clone()))
    (loss0, grads0, v0), (loss1, grads1, v1) = results
    assert torch.allclose(loss0, loss1, rtol=1e-5, atol=1e-6)
    assert grads0.keys() == grads1.keys() and grads0
    for name in grads0:
        assert torch.allclose(grads0[name], grads1[name], rtol=1e-4, atol=1e-6), name
    assert torch.allclose(v0, v1, rtol=1e-4, atol=1e-6)


def test_bf16_autocast_training_step_on_cuda():
    """The dtype auto picks here, LoRA on, one optimizer step: finite loss, the adapters move, the base does not."""
    llm, _ = load_llm(llm_config(lora_r=4))
    base = {n: p.detach().clone() for n, p in llm.named_parameters() if not p.requires_grad}
    trainable = [p for p in llm.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    input_ids, attention, placeholder, vectors = _batch(hidden=llm.config.hidden_size)
    with torch.autocast(CUDA.type, dtype=choose_dtype("auto", CUDA)[0]):
        hidden = last_hidden_states(llm, input_ids, attention, placeholder, vectors)
        loss = hidden[:, -1].float().pow(2).mean()
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainable))
    assert all(torch.equal(base[n], p) for n, p in llm.named_parameters() if n in base)


def test_glta_trains_on_cuda_and_its_checkpoint_loads_on_cpu(tiny_data, tmp_path, monkeypatch):
    from recbole_llm.quick_start import load_data_and_model, run_recbole_llm

    monkeypatch.setattr(sys, "argv", [sys.argv[0]])
    saved = str(tmp_path / "saved")
    result = run_recbole_llm("GLTA", "tiny", config_dict=tiny_config(tiny_data, checkpoint_dir=saved, use_gpu=True))
    assert result["test_result"]["ndcg@10"] > 0.3, result  # the clustered data is easy (test_glta.py: ~0.45)
    (checkpoint,) = glob.glob(os.path.join(saved, "GLTA-*.pth"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config, model, *_ = load_data_and_model(checkpoint)
    assert config["device"].type == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_nccl_is_available():
    assert torch.distributed.is_available() and torch.distributed.is_nccl_available()

"""The LLM layer: loading (tiny-random, the embedded SmolLM2, bad llm_path), placeholder embeddings,
new tokens, LoRA, generation."""
import json
import os

import pytest
import torch

from recbole_llm.data.prompts import PromptTemplate, collate
from recbole_llm.errors import ConfigError
from recbole_llm.llm import embed_inputs, generate_text_variants, generate_texts, last_hidden_states, load_llm
from recbole_llm.llm.precision import choose_dtype


def llm_config(**overrides):
    config = {"llm_path": "tiny-random", "llm_dtype": "auto", "llm_quantization": "auto", "llm_cache_dir": None,
              "llm_gradient_checkpointing": False, "lora_r": 0, "lora_alpha": 16, "lora_dropout": 0.0,
              "lora_target_modules": ["q_proj", "v_proj"], "device": torch.device("cpu")}
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def tiny():
    return load_llm(llm_config())


def test_tiny_random_is_frozen_in_the_auto_dtype(tiny):
    llm, tokenizer = tiny
    assert llm.config.num_hidden_layers == 2 and llm.config.hidden_size == 64
    # auto: bf16 on a CPU with native bf16, else fp32 (every hardware case: test_precision.py)
    assert {p.dtype for p in llm.parameters()} == {choose_dtype("auto", torch.device("cpu"))[0]}
    assert not any(p.requires_grad for p in llm.parameters())
    assert tokenizer.padding_side == "left" and tokenizer.pad_token is not None


def test_placeholder_vectors_reach_the_llm_and_get_gradients(tiny):
    llm, tokenizer = tiny
    template = PromptTemplate("User {user} liked {items}. Next:{slots}", tokenizer)
    leaf = torch.randn(5, 64, requires_grad=True)  # a leaf: must not be written in place
    encoded = [template.encode(user=leaf[:1], items=leaf[1:3], slots=leaf[3:4]),
               template.encode(user=leaf[:1], items=leaf[1:2], slots=leaf[4:5])]
    input_ids, attention, placeholder, vectors, positions = collate(encoded, tokenizer.pad_token_id, "left")
    assert placeholder.sum() == vectors.shape[0] == 7
    embeds = embed_inputs(llm, input_ids, placeholder, vectors)
    assert torch.allclose(embeds[placeholder].float(), vectors.to(embeds.dtype).float())
    hidden = last_hidden_states(llm, input_ids, attention, placeholder, vectors)
    assert positions[0]["slots"] == [input_ids.shape[1] - 1]  # left padding: slots end every row
    hidden[:, -1].float().sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    assert all(p.grad is None for p in llm.parameters())


@pytest.mark.parametrize("lora_r", [0, 4])
def test_new_tokens_train_only_their_rows(lora_r):
    """New tokens are peft trainable tokens (with or without LoRA): only their rows get gradients and train,
    weight decay cannot move an old row, and the new rows' output logits move too (tied head)."""
    llm, tokenizer = load_llm(llm_config(lora_r=lora_r), new_tokens=["<item_1>", "<item_2>"])
    ids = tokenizer.convert_tokens_to_ids(["<item_1>", "<item_2>"])
    old_vocab = ids[0]
    assert ids[1] == old_vocab + 1 and llm.get_input_embeddings().weight.shape[0] >= old_vocab + 2
    before = llm.get_input_embeddings().weight.detach().float().clone()
    trainable = [p for p in llm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=0.1, weight_decay=0.5)
    input_ids = torch.tensor([[5, ids[0], ids[1]]])
    logits_before = llm(input_ids=input_ids).logits[0, -1, ids].detach().float()
    for _ in range(3):
        optimizer.zero_grad()
        llm(input_ids=input_ids).logits.float()[0, -1, ids[0]].neg().backward()
        optimizer.step()
    with torch.no_grad():
        after = llm.get_input_embeddings()(torch.arange(old_vocab + 2)).float()
        logits_after = llm(input_ids=input_ids).logits[0, -1, ids].float()
    assert torch.equal(after[:old_vocab], before[:old_vocab])  # old rows: untouched, decay included
    assert not torch.allclose(after[old_vocab:], before[old_vocab:old_vocab + 2])
    assert logits_after[0] > logits_before[0]
    from peft import get_peft_model_state_dict

    saved = get_peft_model_state_dict(llm)
    assert any("trainable_tokens" in k for k in saved)
    assert all(v.shape[0] == 2 for k, v in saved.items() if "trainable_tokens" in k)  # only the new rows


def test_lora_adds_trainable_adapters_only():
    llm, _ = load_llm(llm_config(lora_r=4))
    trainable = [n for n, p in llm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_batched_generation_keeps_prompt_order(tiny):
    llm, tokenizer = tiny
    prompts = ["a", "a much longer prompt than the first one", "b"]
    texts = generate_texts(llm, tokenizer, prompts, max_new_tokens=3, batch_size=2, show_progress=False)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    alone = generate_texts(llm, tokenizer, prompts[1:2], max_new_tokens=3, batch_size=1, show_progress=False)
    assert texts[1] == alone[0]


@pytest.mark.parametrize("use_chat", [True, False])
def test_prompt_variants_share_their_beginning_and_decode_as_each_prompt_alone(use_chat):
    """The shared beginning is encoded once per row and its cache cropped back for the next variant: the texts
    equal those of each prompt generated alone (no padding, no sharing), rows of any length mixed in a batch."""
    llm, tokenizer = load_llm(llm_config(llm_dtype="fp32"))
    with torch.no_grad():  # sharper than the near-uniform random init: every token of the context matters
        for name, param in llm.named_parameters():
            if name.endswith("proj.weight"):
                param.mul_(8)
    rows = [[f"A user liked {h}. Describe this user.", f"A user liked {h}. Guess the next item, please."]
            for h in ("a", "b c d e f g h i", "j k")]
    rows.append(["x y", "nothing in common"])
    variants = generate_text_variants(llm, tokenizer, rows, max_new_tokens=4, batch_size=3, use_chat=use_chat,
                                      show_progress=False)
    assert len(variants) == 2 and all(len(texts) == len(rows) for texts in variants)
    for v, texts in enumerate(variants):
        for row, text in zip(rows, texts):
            alone = generate_texts(llm, tokenizer, [row[v]], max_new_tokens=4, batch_size=1, use_chat=use_chat,
                                   show_progress=False)[0]
            assert text == alone, (row[v], text, alone)


def test_the_embedded_smollm2_loads_and_generates():
    llm, tokenizer = load_llm(llm_config(llm_path="smollm2"))
    assert llm.config.num_hidden_layers == 30 and llm.config.hidden_size == 576
    text = generate_texts(llm, tokenizer, ["What is the capital of France? Answer in one word."],
                          max_new_tokens=8, show_progress=False)[0]
    assert "paris" in text.lower()


@pytest.mark.parametrize("overrides,match", [
    ({"llm_path": "/no/such/folder"}, "llm_path: no such folder"),
    ({"llm_quantization": "3bit"}, "llm_quantization: unknown value '3bit'"),
    ({"llm_dtype": "fp8"}, "llm_dtype: unknown value 'fp8'"),
])
def test_bad_llm_options_give_one_clear_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_llm(llm_config(**overrides))


def test_a_corrupt_model_folder_is_reported(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    with pytest.raises(ConfigError, match="not a Hugging Face model folder"):
        load_llm(llm_config(llm_path=str(folder)))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="cannot load"):
        load_llm(llm_config(llm_path=str(folder)))


def test_the_smollm2_cache_is_written_atomically(tmp_path, monkeypatch):
    """A conversion that dies leaves no folder behind; the next run converts again and succeeds."""
    from recbole_llm.llm import loading

    def dying_save(self, *args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    from transformers import PreTrainedModel

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dying_save)
    with pytest.raises(KeyboardInterrupt):
        loading.smollm2_folder(str(tmp_path))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    folder = loading.smollm2_folder(str(tmp_path))
    assert os.path.isfile(os.path.join(folder, "config.json"))


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_bitsandbytes_quantization_runs_on_cpu(bits):
    llm, tokenizer = load_llm(llm_config(llm_quantization=bits))
    assert any("bnb" in type(m).__module__ or "bitsandbytes" in type(m).__module__ for m in llm.modules())
    vectors = torch.randn(2, 64, requires_grad=True)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    placeholder = torch.tensor([[False, True, True, False]])
    hidden = last_hidden_states(llm, input_ids, torch.ones_like(input_ids), placeholder, vectors)
    hidden.float().sum().backward()
    assert torch.isfinite(hidden.float()).all() and vectors.grad.abs().sum() > 0


def test_gradient_checkpointing_still_sends_gradients_to_the_inputs():
    llm, _ = load_llm(llm_config(llm_gradient_checkpointing=True))
    assert llm.is_gradient_checkpointing
    llm.train()
    vectors = torch.randn(2, 64, requires_grad=True)
    input_ids = torch.tensor([[5, 6, 7, 8]])
    placeholder = torch.tensor([[False, True, True, False]])
    last_hidden_states(llm, input_ids, torch.ones_like(input_ids), placeholder, vectors).float().sum().backward()
    assert vectors.grad.abs().sum() > 0

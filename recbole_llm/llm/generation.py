"""Batched greedy text generation with a progress bar (for texts the LLM writes once and a stage caches)."""
import torch
from tqdm import tqdm


def chat_prompt(tokenizer, text, system=None):
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


@torch.no_grad()
def generate_texts(llm, tokenizer, prompts, max_new_tokens=32, batch_size=16, desc="Generate", use_chat=True,
                   show_progress=True, system=None):
    """Greedy completions of ``prompts`` (in order). Prompts are batched by length to waste little padding.

    ``system``: a system message for chat models (a short one saves the model's default, often long, one).
    """
    texts = [chat_prompt(tokenizer, p, system) if use_chat else p for p in prompts]
    encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]))
    outputs = [""] * len(texts)
    device = next(llm.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=desc, ncols=100, disable=not show_progress):
            enc = tokenizer.pad({"input_ids": [encoded[i] for i in batch]}, return_tensors="pt").to(device)
            out = llm.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new = out[:, enc["input_ids"].shape[1]:]
            for i, row in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = " ".join(row.split())
    finally:
        tokenizer.padding_side = padding_side
    return outputs

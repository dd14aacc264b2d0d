"""Batched greedy text generation with a progress bar (for texts the LLM writes once and a stage caches)."""
import torch
from tqdm import tqdm

from recbole_llm.llm.inputs import base_model


def chat_prompt(tokenizer, text, system=None):
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return text


@torch.no_grad()
def greedy_decode(llm, input_ids, attention_mask, max_new_tokens, eos_id, pad_id):
    """Greedy decoding with a KV cache, vocabulary logits at the last position only.

    ``generate`` keeps prefill logits over the whole vocabulary for every position (about 4 GB for 64 prompts
    of SmolLM2 here); this loop keeps one row per prompt. Positions follow the attention mask, so a
    left-padded prompt decodes as it would alone.
    """
    base = base_model(llm)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = base.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        next_token = base.lm_head(out.last_hidden_state[:, -1]).argmax(-1)
        next_token = next_token.masked_fill(done, pad_id)
        tokens.append(next_token)
        done |= next_token == eos_id
        if done.all():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), 1)], 1)
        positions = positions[:, -1:] + 1
        out = base.model(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask, position_ids=positions,
                         past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(tokens, 1)


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
            new = greedy_decode(llm, enc["input_ids"], enc["attention_mask"], max_new_tokens,
                                tokenizer.eos_token_id, tokenizer.pad_token_id)
            for i, row in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                outputs[i] = " ".join(row.split())
    finally:
        tokenizer.padding_side = padding_side
    return outputs

"""Generation: batched greedy text (texts the LLM writes once and a stage caches) and beam search, free or
constrained to the items of an ``ItemTrie`` (top-K items with their sequence log-probabilities)."""
import inspect

import torch
from tqdm import tqdm
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from recbole_llm.errors import ConfigError
from recbole_llm.llm.inputs import decoder, embed_inputs

# the name of a KV cache (keyword and output field): ``cache`` in recent transformers, ``past_key_values`` before
CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
    else "past_key_values"


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
    stack, head = decoder(llm), llm.get_output_embeddings()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    out = stack(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True)
    done = torch.zeros(len(input_ids), dtype=torch.bool, device=input_ids.device)
    tokens = []
    for _ in range(max_new_tokens):
        next_token = head(out.last_hidden_state[:, -1]).argmax(-1)
        next_token = next_token.masked_fill(done, pad_id)
        tokens.append(next_token)
        done |= next_token == eos_id
        if done.all():
            break
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), 1)], 1)
        positions = positions[:, -1:] + 1
        out = stack(input_ids=next_token.unsqueeze(1), attention_mask=attention_mask, position_ids=positions,
                    use_cache=True, **{CACHE_KWARG: getattr(out, CACHE_KWARG)})
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


class TrieLogitsProcessor(LogitsProcessor):
    """Keeps beams on an ``ItemTrie``: -inf on every token that continues no item.

    The allowed tokens of all beams come from one vectorised walk of the generated tokens
    (``ItemTrie.continuations``) and are copied into a -inf tensor; HF's ``prefix_allowed_tokens_fn`` instead
    calls Python once per beam per step and builds a dense mask.

    Args:
        trie (ItemTrie): the items.
        prompt_length (int): ids before the generated ones in ``input_ids`` (0 with ``inputs_embeds``).
    """

    def __init__(self, trie, prompt_length):
        self.trie = trie
        self.prompt_length = prompt_length

    def __call__(self, input_ids, scores):
        if self.trie.max_token >= scores.shape[-1]:
            raise ConfigError(f"beam search: the item trie has token id {self.trie.max_token}, beyond the LLM's "
                              f"vocabulary of {scores.shape[-1]}")
        allowed = self.trie.continuations(input_ids[:, self.prompt_length:])
        kept = torch.full_like(scores, -torch.inf)
        kept[allowed] = scores[allowed]
        return kept


@torch.no_grad()
def beam_search(llm, input_ids, attention_mask, num_beams=10, topk=None, max_new_tokens=32, placeholder_mask=None,
                vectors=None, eos_id=None, **generate_kwargs):
    """HF beam search over left-padded prompts; placeholder vectors go in through ``inputs_embeds``.

    Each prompt is encoded once (its KV cache then copied to its beams): ``generate`` alone would encode it
    ``num_beams`` times and compute vocabulary logits at every prompt position. Scores are sequence
    log-probabilities (``length_penalty=0``, HF's exact stopping rule). Extra keyword arguments go to
    ``generate`` (e.g. ``logits_processor``, ``prefix_allowed_tokens_fn``).

    Returns:
        (tokens (B, K, L) LongTensor: the new tokens only, scores (B, K) FloatTensor, best first)
    """
    topk = topk or num_beams
    if topk > num_beams:
        raise ConfigError(f"beam search: topk={topk} is more than num_beams={num_beams}")
    eos_id = llm.generation_config.eos_token_id if eos_id is None else eos_id
    pad_id = llm.generation_config.pad_token_id
    embeds = embed_inputs(llm, input_ids, placeholder_mask, vectors)
    prompt = {"inputs_embeds": embeds} if vectors is not None else {"input_ids": input_ids}
    if input_ids.shape[1] > 1:  # the cache of all but the last prompt token; generate runs the last one
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        prefill = decoder(llm)(inputs_embeds=embeds[:, :-1], attention_mask=attention_mask[:, :-1],
                               position_ids=positions[:, :-1], use_cache=True)
        cache = getattr(prefill, CACHE_KWARG)
        cache.batch_repeat_interleave(num_beams)
        prompt[CACHE_KWARG] = cache
    out = llm.generate(**prompt, attention_mask=attention_mask, num_beams=num_beams, num_return_sequences=topk,
                       max_new_tokens=max_new_tokens, do_sample=False, length_penalty=0.0, early_stopping=False,
                       eos_token_id=eos_id, pad_token_id=eos_id if pad_id is None else pad_id, use_cache=True,
                       output_scores=True, return_dict_in_generate=True, **generate_kwargs)
    new = out.sequences[:, input_ids.shape[1]:] if vectors is None else out.sequences
    return new.reshape(len(input_ids), topk, -1), out.sequences_scores.float().reshape(len(input_ids), topk)


@torch.no_grad()
def beam_search_items(llm, trie, input_ids, attention_mask, num_beams=10, topk=None, placeholder_mask=None,
                      vectors=None, max_new_tokens=None):
    """Top-K items of each prompt by beam search constrained to ``trie``: only real items come out.

    Args:
        llm: the causal LM (peft-wrapped or not).
        trie (ItemTrie): items and their token sequences; its ``end_id`` ends a sequence.
        input_ids, attention_mask (LongTensor): (B, T) left-padded prompts (``prompts.collate(..., "left")``).
        num_beams (int): beams per prompt; ``topk`` (<= num_beams, default num_beams) items are returned.
        placeholder_mask, vectors: placeholder positions and their vectors (as in ``embed_inputs``).
        max_new_tokens (int): at least ``trie.depth`` (the default), so that every item can be completed.

    Returns:
        (items (B, K) LongTensor, scores (B, K) FloatTensor): items best first with their sequence
        log-probabilities (item and end marker). A prompt with fewer than K reachable items (a trie smaller
        than K) gets item 0 (RecBole's padding item) with score -inf in the remaining columns.
    """
    max_new_tokens = max_new_tokens or trie.depth
    if max_new_tokens < trie.depth:
        raise ConfigError(f"beam search: max_new_tokens={max_new_tokens} cannot complete items of "
                          f"{trie.depth} tokens")
    prompt_length = 0 if vectors is not None else input_ids.shape[1]
    tokens, scores = beam_search(llm, input_ids, attention_mask, num_beams, topk, max_new_tokens, placeholder_mask,
                                 vectors, eos_id=trie.end_id,
                                 logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, prompt_length)]))
    items = trie.items_of(tokens.flatten(0, 1)).view(scores.shape)
    dead = (items == 0) | (scores < -1e8)  # HF's filler hypotheses when fewer than K items finished
    return items.masked_fill(dead, 0), scores.masked_fill(dead, -torch.inf)

"""Generation: batched greedy text (texts the LLM writes once and a stage caches) and beam search, free or
constrained to the items of an ``ItemTrie`` (top-K items with their sequence log-probabilities)."""
import inspect
import os

import torch
from tqdm import tqdm
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

from recbole_llm.data.prompts import length_batches
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
def greedy_decode(llm, input_ids, attention_mask, max_new_tokens, eos_id, pad_id, cache=None):
    """Greedy decoding with a KV cache, vocabulary logits at the last position only.

    ``generate`` keeps prefill logits over the whole vocabulary for every position (about 4 GB for 64 prompts
    of SmolLM2 here); this loop keeps one row per prompt. Positions follow the attention mask, so a
    left-padded prompt decodes as it would alone. ``cache``: the KV cache of earlier tokens of these rows
    (``attention_mask`` then covers them and ``input_ids``); decoding extends it in place.
    """
    stack, head = decoder(llm), llm.get_output_embeddings()
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1]:]
    past = {} if cache is None else {CACHE_KWARG: cache}
    out = stack(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True, **past)
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


def generate_texts(llm, tokenizer, prompts, max_new_tokens=32, batch_size=16, desc="Generate", use_chat=True,
                   show_progress=True, system=None):
    """Greedy completions of ``prompts`` (in order). Prompts are batched by length to waste little padding.

    ``system``: a system message for chat models (a short one saves the model's default, often long, one).
    """
    return generate_text_variants(llm, tokenizer, [[p] for p in prompts], max_new_tokens, batch_size, desc,
                                  use_chat, show_progress, system)[0]


def _shared_head(texts):
    """The longest common beginning of ``texts`` that stops before a space (where a tokenizer starts a word
    anyway) and the rest of each; one text is all head."""
    if len(texts) == 1:
        return texts[0], [""]
    cut = max(os.path.commonprefix(texts).rfind(" "), 0)
    return texts[0][:cut], [t[cut:] for t in texts]


def generate_text_variants(llm, tokenizer, rows, max_new_tokens=32, batch_size=16, desc="Generate", use_chat=True,
                           show_progress=True, system=None):
    """Greedy completions of several prompts per row that begin alike (e.g. two questions about one user's
    items); returns one list of texts per variant, rows in order.

    The common beginning of a row's prompts is encoded once and its KV cache reused by each variant (cropped
    back after each), so a row costs its shared part once plus the short rest of each prompt: the same tokens,
    positions and attention as encoding every prompt alone.
    """
    texts = [[chat_prompt(tokenizer, p, system) if use_chat else p for p in row] for row in rows]
    encode = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] if t else []  # noqa: E731
    heads, tails = [], []
    for row in texts:
        head, rest = _shared_head(row)
        head, rest = encode(head), [encode(t) for t in rest]
        if not head or not all(rest):  # every variant needs a token of its own to read the first logits at
            head, rest = head[:-1], [head[-1:] + r for r in rest]
        heads.append(head)
        tails.append(rest)
    device = next(llm.parameters()).device
    outputs = [[""] * len(rows) for _ in range(len(texts[0]) if texts else 0)]
    batches = length_batches([len(heads[i]) + sum(map(len, tails[i])) for i in range(len(rows))], batch_size)
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        for batch in tqdm(batches, desc=desc, ncols=100, disable=not show_progress):
            cache, head_mask = None, torch.zeros(len(batch), 0, dtype=torch.long, device=device)
            if any(heads[i] for i in batch):
                head = tokenizer.pad({"input_ids": [heads[i] for i in batch]}, return_tensors="pt").to(device)
                head_mask = head["attention_mask"]
                positions = (head_mask.cumsum(-1) - 1).clamp(min=0)
                with torch.no_grad():
                    out = decoder(llm)(input_ids=head["input_ids"], attention_mask=head_mask, position_ids=positions,
                                       use_cache=True)
                cache = getattr(out, CACHE_KWARG)
            for variant, texts_out in enumerate(outputs):
                tail = tokenizer.pad({"input_ids": [tails[i][variant] for i in batch]}, return_tensors="pt").to(device)
                new = greedy_decode(llm, tail["input_ids"], torch.cat([head_mask, tail["attention_mask"]], 1),
                                    max_new_tokens, tokenizer.eos_token_id, tokenizer.pad_token_id, cache=cache)
                if cache is not None:  # back to the shared beginning (a negative crop: every transformers version)
                    cache.crop(head_mask.shape[1] - cache.get_seq_length())
                for i, row in zip(batch, tokenizer.batch_decode(new, skip_special_tokens=True)):
                    texts_out[i] = " ".join(row.split())
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
        exclude (BoolTensor): (B, n) items (by id) each prompt must not complete, e.g. the user's seen items;
            a beam only takes a token with an item left under it. None: every item.
        num_beams (int): beams per prompt (``input_ids`` row r belongs to prompt r // num_beams).
    """

    def __init__(self, trie, prompt_length, exclude=None, num_beams=1):
        self.trie = trie
        self.prompt_length = prompt_length
        self.kept = None if exclude is None else trie.kept_counts(exclude)
        self.num_beams = num_beams

    def __call__(self, input_ids, scores):
        if self.trie.max_token >= scores.shape[-1]:
            raise ConfigError(f"beam search: the item trie has token id {self.trie.max_token}, beyond the LLM's "
                              f"vocabulary of {scores.shape[-1]}")
        kept, rows = None, None
        if self.kept is not None:
            kept = self.kept.to(input_ids.device)
            rows = torch.arange(len(input_ids), device=input_ids.device) // self.num_beams
        allowed = self.trie.continuations(input_ids[:, self.prompt_length:], kept, rows)
        kept = torch.full_like(scores, -torch.inf)
        kept[allowed] = scores[allowed]
        return kept


@torch.no_grad()
def beam_search(llm, input_ids, attention_mask, num_beams=10, topk=None, max_new_tokens=32, placeholder_mask=None,
                vectors=None, eos_id=None, length_penalty=0.0, **generate_kwargs):
    """HF beam search over left-padded prompts; placeholder vectors go in through ``inputs_embeds``.

    Each prompt is encoded once (its KV cache then copied to its beams): ``generate`` alone would encode it
    ``num_beams`` times and compute vocabulary logits at every prompt position. Scores are sequence
    log-probabilities (``length_penalty=0``; HF's ``length_penalty=1`` divides them by the generated length),
    HF's exact stopping rule. Extra keyword arguments go to
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
                       max_new_tokens=max_new_tokens, do_sample=False, length_penalty=length_penalty, early_stopping=False,
                       eos_token_id=eos_id, pad_token_id=eos_id if pad_id is None else pad_id, use_cache=True,
                       output_scores=True, return_dict_in_generate=True, **generate_kwargs)
    new = out.sequences[:, input_ids.shape[1]:] if vectors is None else out.sequences
    return new.reshape(len(input_ids), topk, -1), out.sequences_scores.float().reshape(len(input_ids), topk)


@torch.no_grad()
def beam_search_items(llm, trie, input_ids, attention_mask, num_beams=10, topk=None, placeholder_mask=None,
                      vectors=None, max_new_tokens=None, exclude=None, length_penalty=0.0):
    """Top-K items of each prompt by beam search constrained to ``trie``: only real items come out.

    Args:
        llm: the causal LM (peft-wrapped or not).
        trie (ItemTrie): items and their token sequences; its ``end_id`` ends a sequence.
        input_ids, attention_mask (LongTensor): (B, T) left-padded prompts (``prompts.collate(..., "left")``).
        num_beams (int): beams per prompt; ``topk`` (<= num_beams, default num_beams) items are returned.
        placeholder_mask, vectors: placeholder positions and their vectors (as in ``embed_inputs``).
        max_new_tokens (int): at least ``trie.depth`` (the default), so that every item can be completed.
        exclude (BoolTensor): (B, n) items (by id) left out of each prompt's beams (e.g. the user's history);
            None: none.
        length_penalty (float): beams ranked by log-probability / length ** length_penalty: 0 = the sequence's
            log-probability (item and end marker); 1 = per token (HF's default, TCA4Rec's reference code).

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
    processor = TrieLogitsProcessor(trie, prompt_length, exclude, num_beams)
    tokens, scores = beam_search(llm, input_ids, attention_mask, num_beams, topk, max_new_tokens, placeholder_mask,
                                 vectors, eos_id=trie.end_id, length_penalty=length_penalty,
                                 logits_processor=LogitsProcessorList([processor]))
    items = trie.items_of(tokens.flatten(0, 1)).view(scores.shape)
    dead = (items == 0) | (scores < -1e8)  # HF's filler hypotheses when fewer than K items finished
    return items.masked_fill(dead, 0), scores.masked_fill(dead, -torch.inf)

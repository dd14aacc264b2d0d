"""Scoring with the LLM: next-token logits over chosen answers (Yes / No), the causal-LM loss on answer tokens
only, and pooled text encodings (e.g. distilled item embeddings).

Everything runs in the LLM's own dtype; only the returned pooled vectors and the loss are fp32.
"""
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recbole_llm.data.prompts import collate, length_batches
from recbole_llm.errors import ConfigError
from recbole_llm.llm.inputs import input_embedding, last_hidden_states

IGNORE = -100  # label of positions without loss (HF's and PyTorch's ignore_index)


def answer_token_ids(tokenizer, words):
    """The single token id of each answer word (``word`` itself, else ``" " + word``)."""
    ids = []
    for word in words:
        for text in (word, " " + word):
            encoded = tokenizer(text, add_special_tokens=False)["input_ids"]
            if len(encoded) == 1:
                ids.append(encoded[0])
                break
        else:
            raise ConfigError(f"answer word '{word}' is not one token of the LLM's tokenizer "
                              f"({tokenizer(word, add_special_tokens=False)['input_ids']}); choose another word")
    return ids


def last_positions(attention_mask):
    """(B,) index of each row's last real token (left or right padding)."""
    return attention_mask.shape[1] - 1 - attention_mask.flip(1).argmax(1)


def choice_logits(llm, input_ids, attention_mask, token_ids, placeholder_mask=None, vectors=None):
    """(B, len(token_ids)) next-token logits after each prompt over ``token_ids`` (e.g. Yes / No), in the LLM's
    dtype: SeLLaRec's ``[l_Yes, l_No]``; ``softmax(...)[:, 0]`` is then P(Yes) among the two."""
    hidden = last_hidden_states(llm, input_ids, attention_mask, placeholder_mask, vectors)
    last = hidden[torch.arange(len(hidden), device=hidden.device), last_positions(attention_mask)]
    return llm.get_output_embeddings()(last)[:, torch.as_tensor(token_ids, device=hidden.device)]


def answer_labels(input_ids, answer_lengths):
    """Labels for a left-padded batch whose rows end with their answer: ids on the last ``answer_lengths[b]``
    positions of row b, ``-100`` on the prompt and padding."""
    lengths = torch.as_tensor(answer_lengths, device=input_ids.device).unsqueeze(1)
    position = torch.arange(input_ids.shape[1], device=input_ids.device)
    return input_ids.masked_fill(position < input_ids.shape[1] - lengths, IGNORE)


def answer_batch(prompts, answers, pad_id):
    """Left-padded (input_ids, attention_mask, labels) from prompt id lists and answer id lists."""
    input_ids, attention, _, _, _ = collate([(p + a, [], {}) for p, a in zip(prompts, answers)], pad_id, "left")
    return input_ids, attention, answer_labels(input_ids, [len(a) for a in answers])


def answer_loss(logits, labels):
    """Causal-LM loss (mean over answer tokens) from full logits (B, T, V): position t predicts label t + 1."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


def answer_logits(llm, prompts, answers, pad_id, device):
    """Vocabulary logits (B, L, V) that predict each answer token (answers right-padded to L) after its prompt, from
    id lists; the LM head runs on the answer positions only (``logits[b, t]`` predicts ``answers[b][t]``)."""
    input_ids, attention, _, _, _ = collate([(p + a, [], {}) for p, a in zip(prompts, answers)], pad_id, "left")
    hidden = last_hidden_states(llm, input_ids.to(device), attention.to(device))
    total, width = hidden.shape[1], max(map(len, answers))
    lengths = torch.tensor([len(a) for a in answers], device=device)
    # answer token t of row b sits at total - len_b + t; the state before it predicts it
    index = (total - lengths.unsqueeze(1) - 1 + torch.arange(width, device=device)).clamp(max=total - 1)
    hidden = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return llm.get_output_embeddings()(hidden)


def causal_lm_loss(llm, input_ids, attention_mask, labels, placeholder_mask=None, vectors=None):
    """``answer_loss`` of the LLM on a batch, computing vocabulary logits only where an answer token is predicted
    (the prompt positions never reach the LM head)."""
    hidden = last_hidden_states(llm, input_ids, attention_mask, placeholder_mask, vectors)
    target = labels[:, 1:]
    predicting = target != IGNORE
    logits = llm.get_output_embeddings()(hidden[:, :-1][predicting])
    return F.cross_entropy(logits.float(), target[predicting])


@torch.no_grad()
def encode_texts(llm, tokenizer, texts, pooling="mean", batch_size=32, layer="last", max_length=None,
                 show_progress=True, desc="Encode"):
    """(len(texts), H) fp32 CPU tensor: each text's hidden states pooled over its tokens.

    Args:
        pooling: ``mean`` over the text's tokens (padding masked out) or ``last`` (the state that predicts the
            next token, e.g. after "This item is best described as:").
        layer: ``last`` (the decoder's output) or ``input`` (the input embeddings: AlignTokenRec's LLM embedding).
        max_length: truncate texts to this many tokens (None: keep all).
    Texts are tokenized as written (no special tokens) and batched by length to waste little padding.
    """
    if pooling not in ("mean", "last"):
        raise ConfigError(f"encode_texts: pooling must be 'mean' or 'last', not '{pooling}'")
    if layer not in ("last", "input"):
        raise ConfigError(f"encode_texts: layer must be 'last' or 'input', not '{layer}'")
    encoded = tokenizer(list(texts), add_special_tokens=False, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ConfigError("encode_texts: an empty text has no tokens to pool")
    device = input_embedding(llm).weight.device
    out = torch.zeros(len(encoded), input_embedding(llm).weight.shape[1])
    batches = length_batches([len(ids) for ids in encoded], batch_size)
    for batch in tqdm(batches, desc=desc, ncols=100, disable=not show_progress):
        input_ids, attention, _, _, _ = collate([(encoded[i], [], {}) for i in batch], tokenizer.pad_token_id, "left")
        input_ids, attention = input_ids.to(device), attention.to(device)
        if layer == "input":
            hidden = input_embedding(llm)(input_ids)
        else:
            hidden = last_hidden_states(llm, input_ids, attention)
        if pooling == "mean":
            mask = attention.unsqueeze(-1).float()
            pooled = (hidden.float() * mask).sum(1) / mask.sum(1)
        else:
            pooled = hidden[:, -1].float()  # left padding: the last position is every text's last token
        out[batch] = pooled.cpu()
    return out

"""Run an LLM on prompts whose placeholder positions carry our own vectors (projected user/item tokens).

``embed_inputs`` builds ``inputs_embeds`` out of place (``masked_scatter``), so gradients flow from the LLM's
outputs back to the vectors even when the LLM itself is frozen.
"""
import torch


def input_embedding(llm):
    return llm.get_input_embeddings()


def decoder(llm):
    """The transformer stack without its LM head (hidden states out), under a peft wrapper or 4/8-bit too."""
    return llm.get_decoder()


def embed_inputs(llm, input_ids, placeholder_mask=None, vectors=None):
    embeds = input_embedding(llm)(input_ids)
    if vectors is None:
        return embeds
    return embeds.masked_scatter(placeholder_mask.unsqueeze(-1), vectors.to(embeds.dtype))


def last_hidden_states(llm, input_ids, attention_mask, placeholder_mask=None, vectors=None):
    """Last-layer hidden states (B, T, H) of the LLM for a batch built by ``prompts.collate``."""
    inputs_embeds = embed_inputs(llm, input_ids, placeholder_mask, vectors)
    out = decoder(llm)(inputs_embeds=inputs_embeds, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def gather_positions(hidden, positions, name):
    """Hidden states at a field's positions: (B, n, H) for a field with the same n in every row."""
    index = torch.tensor([p[name] for p in positions], device=hidden.device)
    return hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))


def embedding_std(llm):
    return input_embedding(llm).weight.float().std().item()


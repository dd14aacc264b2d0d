"""Prompt templates -> token ids with placeholder positions for vectors (user / item tokens, answer slots).

A template is a YAML string (or a list of segments) with ``{field}`` names. When encoding, a field's value is
- a string or a list of token ids: written as text;
- a tensor of shape (n, d): n placeholder positions whose input embeddings become those n vectors.
``encode`` returns the ids, the vectors in position order, and where each vector field landed, so that a batch
can be embedded with one ``masked_scatter`` (see ``recbole_llm.llm.inputs``).
"""
import string

import torch


class PromptTemplate:
    def __init__(self, template, tokenizer, placeholder_id=None):
        self.template = "".join(template) if isinstance(template, (list, tuple)) else str(template)
        self.tokenizer = tokenizer
        self.placeholder_id = tokenizer.unk_token_id if placeholder_id is None else placeholder_id
        if self.placeholder_id is None:
            self.placeholder_id = tokenizer.eos_token_id
        self.parts = [(self._tokenize(literal), name) for literal, name, _, _ in string.Formatter().parse(self.template)]
        self.fields = [name for _, name in self.parts if name]

    def _tokenize(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def encode(self, **values):
        ids, vectors, positions = [], [], {}
        for literal_ids, name in self.parts:
            ids += literal_ids
            if not name:
                continue
            if name not in values:
                raise KeyError(f"template field '{{{name}}}' has no value")
            value = values[name]
            if isinstance(value, torch.Tensor):
                positions[name] = list(range(len(ids), len(ids) + value.shape[0]))
                ids += [self.placeholder_id] * value.shape[0]
                vectors.append(value)
            elif isinstance(value, str):
                ids += self._tokenize(value)
            else:
                ids += list(value)
        return ids, vectors, positions


def length_batches(lengths, batch_size):
    """Row indices in batches of ``batch_size``, shortest rows first: rows of similar length share a batch, so
    little padding is computed. Callers put each batch's outputs back at its indices."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def collate(encoded, pad_id, padding_side="right"):
    """Batch ``encode`` outputs: (input_ids, attention_mask, placeholder_mask, vectors, positions)."""
    length = max(len(ids) for ids, _, _ in encoded)
    input_ids = torch.full((len(encoded), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), length), dtype=torch.long)
    placeholder = torch.zeros((len(encoded), length), dtype=torch.bool)
    vectors, positions = [], []
    for row, (ids, vecs, pos) in enumerate(encoded):
        offset = length - len(ids) if padding_side == "left" else 0
        input_ids[row, offset:offset + len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention[row, offset:offset + len(ids)] = 1
        for name_positions in pos.values():
            placeholder[row, [offset + p for p in name_positions]] = True
        vectors += vecs
        positions.append({name: [offset + p for p in p_list] for name, p_list in pos.items()})
    vectors = torch.cat(vectors, 0) if vectors else None
    return input_ids, attention, placeholder, vectors, positions

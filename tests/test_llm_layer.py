"""The LLM layer shared by the generative and scoring models: the item trie, constrained beam search, choice
logits, the answer-token loss and pooled text encodings (tiny-random LLM, fp32 unless a test says otherwise)."""
import random

import pytest
import torch
import torch.nn.functional as F

from recbole_llm.data.prompts import collate
from recbole_llm.errors import ConfigError
from recbole_llm.llm import (ItemTrie, answer_batch, answer_loss, answer_token_ids, beam_search, beam_search_items,
                             causal_lm_loss, choice_logits, decoder, embed_inputs, encode_texts, load_llm)
from tests.test_llm import llm_config

END = 2  # SmolLM2's EOS, the trie's end marker


@pytest.fixture(scope="module")
def tiny():
    return load_llm(llm_config(llm_dtype="fp32"))


def random_sequences(rng, n, first_id=1, tokens=range(100, 140)):
    """Token sequences with shared prefixes, some a prefix of another (short alphabet, lengths 1-4)."""
    sequences, seen = {}, set()
    while len(sequences) < n:
        seq = tuple(rng.choice(tokens) for _ in range(rng.randint(1, 4)))
        if seq not in seen:
            seen.add(seq)
            sequences[first_id + len(sequences)] = list(seq)
    return sequences


def prefixes_of(trie):
    return {tuple(trie.tokens(i)[:j]) for i in trie._sequences for j in range(len(trie.tokens(i)) + 2)}


def random_prompts(rng, n, pad_id):
    """Left-padded random prompts of different lengths."""
    ids = [[rng.randrange(200, 5000) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    input_ids, attention, _, _, _ = collate([(p, [], {}) for p in ids], pad_id, "left")
    return input_ids, attention


def test_allowed_is_never_empty_and_the_vectorised_mask_agrees():
    rng = random.Random(0)
    trie = ItemTrie(random_sequences(rng, 60), END)
    assert any(trie.tokens(a)[:-1] == trie.tokens(b)[:len(trie.tokens(a)) - 1] and a != b
               for a in trie._sequences for b in trie._sequences)  # some item is a prefix of another
    for item in list(trie._sequences):
        assert trie.item(trie.tokens(item)) == item and trie.item(trie.tokens(item)[:-1]) == item
        assert trie.allowed(trie.tokens(item)) == [END]  # a complete item allows only the end marker
    prefixes = sorted(prefixes_of(trie))
    width = max(map(len, prefixes))
    batch = torch.tensor([list(p) + [END] * (width - len(p)) for p in prefixes])
    mask = trie.next_token_mask(batch, 200, every_position=True)
    for row, prefix in enumerate(prefixes):
        allowed = trie.allowed(prefix)
        assert allowed
        assert sorted(allowed) == torch.nonzero(mask[row, len(prefix)]).flatten().tolist()
    assert mask.any(-1).all()
    assert torch.equal(trie.next_token_mask(batch[:, :2], 200), mask[:, 2])  # after the whole prefix
    with pytest.raises(KeyError):
        trie.allowed([99])


def test_duplicate_sequences_and_bad_items_are_named():
    trie = ItemTrie({3: [10, 11]}, END)
    with pytest.raises(ConfigError, match="items 3 and 7 have the same token sequence"):
        trie.add(7, [10, 11, END])
    with pytest.raises(ConfigError, match="item 3 is already"):
        trie.add(3, [12])
    with pytest.raises(ConfigError, match="empty"):
        trie.add(8, [])
    with pytest.raises(ConfigError, match="start at 1"):
        trie.add(0, [13])


def test_items_of_maps_generated_sequences_and_rejects_incomplete_ones():
    trie = ItemTrie({1: [5, 6], 2: [5, 6, 7], 3: [9]}, END)
    sequences = torch.tensor([[5, 6, 7, END, END], [5, 6, END, 0, 0], [5, 6, 0, 0, 0], [9, END, 4, 4, 4],
                              [5, END, END, END, END]])
    assert trie.items_of(sequences).tolist() == [2, 1, 0, 3, 0]


def soft_labels_reference(trie, prefix, scores, vocab_size):
    """One prefix at a time, with the dict trie: the loop TCA4Rec's reference runs."""
    under = [i for i in trie._sequences if tuple(trie.tokens(i)[:len(prefix)]) == tuple(prefix)]
    probs = torch.softmax(scores[torch.tensor(under)].float(), 0)
    label = torch.zeros(vocab_size)
    for item, p in zip(under, probs):
        tokens = trie.tokens(item)
        label[tokens[len(prefix)] if len(prefix) < len(tokens) else END] += p
    return label


def test_soft_labels_sum_to_one_over_continuing_tokens_and_match_a_loop():
    rng = random.Random(1)
    trie = ItemTrie(random_sequences(rng, 40), END)
    trie.add(41, [100, 101, 102, 103, 104])  # after add(): the sorted view is rebuilt
    targets = [trie.tokens(i) for i in rng.sample(sorted(trie._sequences), 8)] + [trie.tokens(41)]
    width = max(map(len, targets))
    prefixes = torch.tensor([t + [-100] * (width - len(t)) for t in targets])  # label padding
    scores = torch.randn(len(targets), 50) * 3
    labels = trie.soft_labels(prefixes, scores, 200)
    mask = trie.next_token_mask(prefixes, 200, every_position=True)
    assert labels.shape == (len(targets), width + 1, 200)
    assert torch.allclose(labels.sum(-1), torch.ones(len(targets), width + 1))
    assert (labels[~mask] == 0).all() and (labels[mask] > 0).all()
    for b, target in enumerate(targets):
        for j in range(len(target)):
            assert torch.allclose(labels[b, j], soft_labels_reference(trie, target[:j], scores[b], 200), atol=1e-6)
    with pytest.raises(ValueError, match="continues no item"):
        trie.soft_labels(torch.tensor([[99]]), scores[:1], 200)


def sequence_logprob(llm, prompt_ids, tokens):
    ids = torch.tensor([prompt_ids + tokens])
    logp = F.log_softmax(llm(input_ids=ids).logits[0].float(), -1)
    return sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(tokens))


def test_constrained_beam_search_emits_only_real_items(tiny):
    llm, tokenizer = tiny
    rng = random.Random(2)
    trie = ItemTrie(random_sequences(rng, 80), END)
    input_ids, attention = random_prompts(rng, 6, tokenizer.pad_token_id)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=8, topk=5)
    assert items.shape == scores.shape == (6, 5)
    assert all(i in trie for i in items.flatten().tolist())  # 100% valid
    assert all(len(set(row)) == 5 for row in items.tolist())
    assert (scores[:, :-1] >= scores[:, 1:]).all()
    for b in range(6):  # the scores are the sequence log-probabilities, padded rows included
        prompt = input_ids[b][attention[b].bool()].tolist()
        assert scores[b, 0].item() == pytest.approx(sequence_logprob(llm, prompt, trie.tokens(items[b, 0].item())),
                                                    abs=1e-3)
    prompt = input_ids[0][attention[0].bool()].tolist()
    assert len(prompt) < input_ids.shape[1]  # row 0 is padded
    # left padding: a prompt alone finds what it finds in the batch
    alone, alone_scores = beam_search_items(llm, trie, input_ids[:1, -len(prompt):], attention[:1, -len(prompt):],
                                            num_beams=8, topk=5)
    assert torch.equal(alone, items[:1]) and torch.allclose(alone_scores, scores[:1], atol=1e-4)
    # HF's prefix_allowed_tokens_fn reading the dict trie finds the same items
    tokens, fn_scores = beam_search(llm, input_ids, attention, 8, 5, trie.depth, eos_id=END,
                                    prefix_allowed_tokens_fn=trie.prefix_allowed_tokens_fn(input_ids.shape[1]))
    assert torch.equal(trie.items_of(tokens.flatten(0, 1)).view(6, 5), items)
    assert torch.allclose(fn_scores, scores, atol=1e-4)


def test_length_penalty_ranks_beams_per_token(tiny):
    """``length_penalty=1`` (TCA4Rec's reference: HF's default) scores a beam by its log-probability per token;
    0 (ours) by the item's log-probability."""
    llm, tokenizer = tiny
    rng = random.Random(5)
    trie = ItemTrie(random_sequences(rng, 60), END)
    input_ids, attention = random_prompts(rng, 4, tokenizer.pad_token_id)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=8, topk=5, length_penalty=1.0)
    assert all(i in trie for i in items.flatten().tolist()) and (scores[:, :-1] >= scores[:, 1:]).all()
    for b in range(4):
        prompt = input_ids[b][attention[b].bool()].tolist()
        for k in range(5):
            tokens = trie.tokens(items[b, k].item())
            assert scores[b, k].item() == pytest.approx(sequence_logprob(llm, prompt, tokens) / len(tokens), abs=1e-3)


def test_constrained_beam_search_stays_valid_after_add_on_random_prompts(tiny):
    llm, tokenizer = tiny
    rng = random.Random(3)
    trie = ItemTrie(random_sequences(rng, 30), END)
    for round_ in range(3):
        new = random_sequences(rng, 10, first_id=100 + 10 * round_, tokens=range(140, 150 + round_))
        for item, tokens in new.items():
            if trie.item(tokens) is None:
                trie.add(item, tokens)
        input_ids, attention = random_prompts(rng, 4, tokenizer.pad_token_id)
        items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=10)
        assert all(i in trie for i in items.flatten().tolist()) and torch.isfinite(scores).all()


def test_placeholder_vectors_go_in_as_inputs_embeds(tiny):
    llm, tokenizer = tiny
    rng = random.Random(4)
    trie = ItemTrie(random_sequences(rng, 50), END)
    input_ids, attention = random_prompts(rng, 3, tokenizer.pad_token_id)
    placeholder = torch.zeros_like(attention, dtype=torch.bool)
    placeholder[:, -2] = True
    # vectors equal to the real tokens' embeddings: the embeds path must find what the ids path finds
    vectors = llm.get_input_embeddings()(input_ids)[placeholder]
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=6, topk=4)
    masked = input_ids.masked_fill(placeholder, tokenizer.unk_token_id)
    via_embeds, embeds_scores = beam_search_items(llm, trie, masked, attention, num_beams=6, topk=4,
                                                  placeholder_mask=placeholder, vectors=vectors)
    assert torch.equal(items, via_embeds) and torch.allclose(scores, embeds_scores, atol=1e-4)


def test_a_trie_smaller_than_k_pads_with_item_zero(tiny):
    llm, tokenizer = tiny
    trie = ItemTrie({4: [300], 5: [300, 301], 6: [302, 303]}, END)
    input_ids, attention = random_prompts(random.Random(5), 2, tokenizer.pad_token_id)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=5)
    assert sorted(items[0, :3].tolist()) == [4, 5, 6] and (items[:, 3:] == 0).all()
    assert torch.isfinite(scores[:, :3]).all() and torch.isneginf(scores[:, 3:]).all()
    with pytest.raises(ConfigError, match="max_new_tokens"):
        beam_search_items(llm, trie, input_ids, attention, num_beams=5, max_new_tokens=1)
    trie.add(7, [len(tokenizer) + 5])
    with pytest.raises(ConfigError, match="beyond the LLM's vocabulary"):
        beam_search_items(llm, trie, input_ids, attention, num_beams=5)


def test_answer_token_ids_find_single_tokens_or_fail_clearly(tiny):
    _, tokenizer = tiny
    yes, no = answer_token_ids(tokenizer, ["Yes", "No"])
    assert tokenizer.decode([yes]) == "Yes" and tokenizer.decode([no]) == "No"
    assert tokenizer.decode(answer_token_ids(tokenizer, ["Absolutely"])) == " Absolutely"  # two tokens without
    with pytest.raises(ConfigError, match="'Dislike' is not one token"):
        answer_token_ids(tokenizer, ["Dislike"])


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_choice_logits_are_the_lm_logits_at_those_ids_in_the_llm_dtype(dtype):
    llm, tokenizer = load_llm(llm_config(llm_dtype=dtype))
    input_ids, attention = random_prompts(random.Random(6), 4, tokenizer.pad_token_id)
    ids = answer_token_ids(tokenizer, ["Yes", "No"])
    logits = choice_logits(llm, input_ids, attention, ids)
    full = llm(input_ids=input_ids, attention_mask=attention).logits[:, -1, ids]
    assert logits.dtype == next(llm.parameters()).dtype
    assert torch.allclose(logits.float(), full.float(), atol=1e-5)


def test_answer_loss_ignores_prompt_positions(tiny):
    llm, tokenizer = tiny
    rng = random.Random(7)
    prompts = [[rng.randrange(200, 5000) for _ in range(rng.randint(2, 6))] for _ in range(3)]
    answers = [[rng.randrange(200, 5000) for _ in range(n)] + [END] for n in (1, 3, 2)]
    input_ids, attention, labels = answer_batch(prompts, answers, tokenizer.pad_token_id)
    assert (labels != -100).sum(1).tolist() == [2, 4, 3]
    logits = llm(input_ids=input_ids, attention_mask=attention).logits
    manual = []
    for b, answer in enumerate(answers):
        start = input_ids.shape[1] - len(answer)
        logp = F.log_softmax(logits[b].float(), -1)
        manual += [-logp[start + j - 1, t] for j, t in enumerate(answer)]
    manual = torch.stack(manual).mean()
    assert torch.allclose(answer_loss(logits, labels), manual, atol=1e-5)
    assert torch.allclose(causal_lm_loss(llm, input_ids, attention, labels), manual, atol=1e-5)
    assert not torch.allclose(answer_loss(logits, input_ids), manual)  # prompt targets would change it


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_encode_texts_masks_padding(tiny, pooling):
    llm, tokenizer = tiny
    texts = ["a short title", "a much longer description of an item that pads the first text in its batch"]
    batched = encode_texts(llm, tokenizer, texts, pooling=pooling, batch_size=2, show_progress=False)
    alone = encode_texts(llm, tokenizer, texts[:1], pooling=pooling, show_progress=False)
    assert batched.dtype == torch.float32 and batched.device.type == "cpu" and batched.shape == (2, 64)
    assert torch.allclose(batched[0], alone[0], atol=1e-5)
    assert not torch.allclose(batched[0], batched[1])
    words = encode_texts(llm, tokenizer, texts, pooling=pooling, layer="input", show_progress=False)
    ids = tokenizer(texts[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    embeds = llm.get_input_embeddings()(ids)[0]
    assert torch.allclose(words[0], embeds.mean(0) if pooling == "mean" else embeds[-1], atol=1e-6)


def test_the_decoder_is_found_under_lora(tiny):
    lora, tokenizer = load_llm(llm_config(llm_dtype="fp32", lora_r=4))
    assert type(decoder(lora)).__name__ == "LlamaModel"
    input_ids, attention = random_prompts(random.Random(8), 2, tokenizer.pad_token_id)
    hidden = decoder(lora)(inputs_embeds=embed_inputs(lora, input_ids), attention_mask=attention).last_hidden_state
    assert hidden.shape == (2, input_ids.shape[1], 64)


def test_code_tokens_added_as_new_tokens_decode_under_lora_and_trainable_tokens():
    """AlignTokenRec's case: item codes are new tokens (peft trainable tokens) under LoRA; the trie is over them."""
    codes = [f"<c{level}_{k}>" for level in range(3) for k in range(4)]
    llm, tokenizer = load_llm(llm_config(llm_dtype="fp32", lora_r=4), new_tokens=codes)
    ids = tokenizer.convert_tokens_to_ids(codes)
    rng = random.Random(9)
    sequences = {}
    while len(sequences) < 20:
        seq = [ids[4 * level + rng.randrange(4)] for level in range(3)]
        if seq not in sequences.values():
            sequences[len(sequences) + 1] = seq
    trie = ItemTrie(sequences, END)
    input_ids, attention = random_prompts(rng, 3, tokenizer.pad_token_id)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=6)
    assert all(i in trie for i in items.flatten().tolist()) and torch.isfinite(scores).all()
    answer = [trie.tokens(items[0, 0].item())]
    batch_ids, batch_attention, labels = answer_batch([input_ids[0][attention[0].bool()].tolist()], answer,
                                                      tokenizer.pad_token_id)
    loss = causal_lm_loss(llm, batch_ids, batch_attention, labels)
    assert loss.item() == pytest.approx(-scores[0, 0].item() / len(answer[0]), abs=1e-3)
    loss.backward()
    assert any(p.grad is not None and "trainable_tokens" in n for n, p in llm.named_parameters())


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_decoding_and_scoring_under_quantization(quantization):
    pytest.importorskip("bitsandbytes")
    try:
        llm, tokenizer = load_llm(llm_config(llm_quantization=quantization))
    except ConfigError as e:  # a bitsandbytes build or a device check without CPU support
        pytest.skip(str(e))
    assert type(decoder(llm)).__name__ == "LlamaModel"
    input_ids, attention = random_prompts(random.Random(10), 2, tokenizer.pad_token_id)
    trie = ItemTrie(random_sequences(random.Random(10), 12), END)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=4)
    assert all(i in trie for i in items.flatten().tolist()) and torch.isfinite(scores).all()
    assert choice_logits(llm, input_ids, attention, answer_token_ids(tokenizer, ["Yes", "No"])).shape == (2, 2)


def _left_out_reference(trie, prefix, excluded):
    """Brute force: the tokens after ``prefix`` with a non-excluded item under them (``end`` if none)."""
    tokens = {trie.tokens(i)[len(prefix)] for i in trie._sequences if i not in excluded
              and len(trie.tokens(i)) > len(prefix) and tuple(trie.tokens(i)[:len(prefix)]) == prefix}
    if not tokens and prefix and prefix[-1] == END:  # an ended item continues with the end marker
        item = trie.item(prefix)
        tokens = {END} if item is not None and item not in excluded else set()
    return tokens or {END}


def test_excluded_items_are_left_out_of_the_allowed_tokens():
    """``continuations(prefixes, kept, rows)``: a token is allowed only with a kept item under it (a beam never
    completes an excluded item); with nothing excluded the pairs are those of ``continuations(prefixes)``."""
    rng = random.Random(11)
    trie = ItemTrie(random_sequences(rng, 60, tokens=range(100, 106)), END)
    prefixes = sorted(prefixes_of(trie))
    exclude = torch.rand(3, 61, generator=torch.Generator().manual_seed(0)) < torch.tensor([[0.0], [0.4], [0.9]])
    kept = trie.kept_counts(exclude)
    for length in sorted({len(p) for p in prefixes}):
        group = [p for p in prefixes if len(p) == length]
        batch = torch.tensor(group, dtype=torch.long).view(len(group), length)
        rows = torch.tensor([r % 3 for r in range(len(group))])
        got = [set() for _ in group]
        for row, token in zip(*[t.tolist() for t in trie.continuations(batch, kept, rows)]):
            got[row].add(token)
        for row, prefix in enumerate(group):
            excluded = set(torch.nonzero(exclude[rows[row]]).flatten().tolist())
            assert got[row] == _left_out_reference(trie, prefix, excluded), (prefix, excluded)
        plain = sorted(zip(*[t.tolist() for t in trie.continuations(batch)]))
        none_out = trie.kept_counts(torch.zeros(len(group), 61, dtype=torch.bool))
        assert sorted(zip(*[t.tolist() for t in trie.continuations(batch, none_out)])) == plain


def test_beam_search_leaves_excluded_items_out(tiny):
    """A trie of 8 items and 8 beams: every item is found, so leaving some out gives the others in the same order
    with the same scores (the rows padded with item 0)."""
    llm, tokenizer = tiny
    rng = random.Random(12)
    trie = ItemTrie(random_sequences(rng, 8, tokens=range(100, 104)), END)
    input_ids, attention = random_prompts(rng, 3, tokenizer.pad_token_id)
    items, scores = beam_search_items(llm, trie, input_ids, attention, num_beams=8)
    exclude = torch.zeros(3, 9, dtype=torch.bool)
    exclude[0, [1, 2, 3]] = True
    exclude[1, items[1, 0]] = True  # the best item
    left, left_scores = beam_search_items(llm, trie, input_ids, attention, num_beams=8, exclude=exclude)
    for row in range(3):
        keep = ~exclude[row, items[row]]
        n = int(keep.sum())
        assert left[row, :n].tolist() == items[row, keep].tolist()
        assert torch.allclose(left_scores[row, :n], scores[row, keep], atol=1e-4)
        assert (left[row, n:] == 0).all() and torch.isneginf(left_scores[row, n:]).all()
    same, same_scores = beam_search_items(llm, trie, input_ids, attention, num_beams=8,
                                          exclude=torch.zeros(3, 9, dtype=torch.bool))
    assert torch.equal(same, items) and torch.equal(same_scores, scores)

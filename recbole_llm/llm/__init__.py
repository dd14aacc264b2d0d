from recbole_llm.llm.generation import (TrieLogitsProcessor, beam_search, beam_search_items, generate_text_variants,
                                        generate_texts)
from recbole_llm.llm.inputs import decoder, embed_inputs, embedding_std, gather_positions, last_hidden_states
from recbole_llm.llm.loading import load_llm
from recbole_llm.llm.scoring import (answer_batch, answer_labels, answer_loss, answer_token_ids, causal_lm_loss,
                                     choice_logits, encode_texts)
from recbole_llm.llm.trie import ItemTrie

__all__ = ["load_llm", "decoder", "embed_inputs", "last_hidden_states", "gather_positions", "embedding_std",
           "generate_texts", "generate_text_variants", "beam_search", "beam_search_items", "TrieLogitsProcessor",
           "ItemTrie",
           "answer_token_ids", "choice_logits", "answer_labels", "answer_batch", "answer_loss", "causal_lm_loss",
           "encode_texts"]

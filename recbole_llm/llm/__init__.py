from recbole_llm.llm.generation import generate_texts
from recbole_llm.llm.inputs import embed_inputs, embedding_std, gather_positions, last_hidden_states
from recbole_llm.llm.loading import load_llm

__all__ = ["load_llm", "embed_inputs", "last_hidden_states", "gather_positions", "embedding_std", "generate_texts"]

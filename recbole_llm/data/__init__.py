from recbole_llm.data.labeled import SeLLaRecDataset

__all__ = ["SeLLaRecDataset"]

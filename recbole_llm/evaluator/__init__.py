from recbole_llm.evaluator.groups import warm_cold_report
from recbole_llm.evaluator.metrics import UAUC

__all__ = ["UAUC", "warm_cold_report"]

"""Metrics RecBole 1.2.1 does not have, in RecBole's ``AbstractMetric`` style (registered by ``compat.apply()``).

- ``UAUC``: mean per-user AUC over the users who have both a positive and a negative row in the evaluated split
  (labeled / CTR evaluation, next to RecBole's ``AUC`` and ``LogLoss``).
"""
from logging import getLogger

import numpy as np
import pandas as pd
from recbole.evaluator.base_metric import AbstractMetric
from recbole.utils import EvaluatorType


class UAUC(AbstractMetric):
    r"""UAUC (user AUC): the AUC of each user's own rows, averaged over users with both labels, as in the
    CTR evaluation of TALLRec / CoLLM / SeLLaRec. Unlike RecBole's ``GAUC`` (full-ranking, weighted by positives)
    it works on labeled rows and weighs every user the same; users with one class only are skipped.

    .. math::
        \mathrm{AUC}(u) = \frac{\sum_{i \in P_u} rank_u(i) - \frac{|P_u|(|P_u|+1)}{2}}{|P_u| \cdot |N_u|}, \qquad
        \mathrm{UAUC} = \frac{1}{|U'|} \sum_{u \in U'} \mathrm{AUC}(u), \quad U' = \{u : |P_u| > 0, |N_u| > 0\}

    :math:`rank_u(i)` is the ascending rank of row :math:`i`'s score among user :math:`u`'s rows (ties get their
    average rank), :math:`P_u` / :math:`N_u` are the user's positive / negative rows.
    """

    metric_type = EvaluatorType.VALUE
    metric_need = ["rec.score", "data.label", "data.user"]

    def calculate_metric(self, dataobject):
        preds = dataobject.get("rec.score").squeeze(-1).numpy()
        labels = dataobject.get("data.label").squeeze(-1).numpy()
        users = dataobject.get("data.user").squeeze(-1).numpy()
        return {"uauc": round(self.metric_info(preds, labels, users), self.decimal_place)}

    def metric_info(self, preds, labels, users):
        """Mean per-user AUC; ``nan`` (with a warning, as RecBole's ``AUC``) when no user has both labels."""
        rows = pd.DataFrame({"user": users, "pos": labels > 0.5})
        rows["rank"] = pd.Series(preds, dtype="float64").groupby(users).rank(method="average").to_numpy()
        rows["pos_rank"] = rows["rank"].where(rows["pos"], 0.0)
        per_user = rows.groupby("user").agg(n=("pos", "size"), p=("pos", "sum"), pos_rank=("pos_rank", "sum"))
        per_user = per_user[(per_user.p > 0) & (per_user.p < per_user.n)]
        if per_user.empty:
            getLogger().warning("No user has both positive and negative rows, UAUC is meaningless")
            return float("nan")
        p, neg = per_user.p.to_numpy(np.float64), (per_user.n - per_user.p).to_numpy(np.float64)
        auc = (per_user.pos_rank.to_numpy() - p * (p + 1) / 2) / (p * neg)
        return float(auc.mean())

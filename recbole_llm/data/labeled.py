"""``SeLLaRecDataset``: RecBole's ``Dataset`` for CTR models that need labels, with a split by month windows.

Labels come from RecBole's ``threshold`` option (``{rating: 4}``: rating > 3 is positive, as CoLLM / SeLLaRec)
or from a ``LABEL_FIELD`` column already in the ``.inter`` file; without either, or with a threshold on a field
the file lacks, the run stops with one ``ConfigError`` line naming the option and the field.

``split_months: [train, valid, test]`` reproduces CoLLM's temporal protocol: the last ``train + valid + test``
months of the timeline (a month = 30.44 days, counted back from the last interaction), cut into three
consecutive windows; older interactions are dropped. CoLLM / SeLLaRec on MovieLens-1M: the last 20 months,
10:5:5 (the converter's ``ml-1m-sellarec`` preset writes those files). ml-100k spans only 7 months
(1997-09-20 .. 1998-04-22), so the same proportions give ``[3.5, 1.75, 1.75]``. Without ``split_months``
RecBole's ``eval_args`` split applies, and benchmark files (``benchmark_filename``) always win.
"""
import numpy as np
import torch
from recbole.data.dataset import Dataset

from recbole_llm.errors import ConfigError

MONTH = 30.44 * 24 * 3600  # seconds


class SeLLaRecDataset(Dataset):
    def _set_label_by_threshold(self):
        threshold = self.config["threshold"]
        if not threshold:
            if self.label_field not in self.inter_feat:
                raise ConfigError(f"threshold: {self.config['model']} needs 0/1 labels, but threshold is not set and "
                                  f"{self.dataset_name}.inter has no '{self.label_field}' field (LABEL_FIELD); set "
                                  "e.g. threshold: {rating: 4} (rating > 3 is positive)")
            return
        missing = [field for field in threshold if field not in self.inter_feat]
        if missing:
            raise ConfigError(f"threshold: {self.dataset_name}.inter has no field '{missing[0]}' to label by "
                              f"(fields: {', '.join(self.inter_feat.columns)}); set RATING_FIELD / load_col or "
                              "another threshold field")
        super()._set_label_by_threshold()

    def _normalize(self):
        """Remember the raw time range: ``normalize_all`` (RecBole's context-aware default) rescales timestamps."""
        if self.time_field in self.inter_feat:
            times = self.inter_feat[self.time_field]
            self._time_range = (float(times.min()), float(times.max()))
        super()._normalize()
        if self.time_field in self.inter_feat:
            self._time_scaled = float(self.inter_feat[self.time_field].max()) != self._time_range[1]

    def raw_times(self):
        """The time field in seconds, whatever RecBole's normalisation did to it."""
        times = self.inter_feat[self.time_field].numpy().astype(np.float64)
        low, high = self._time_range
        if self._time_scaled:  # normalised to [0, 1]
            times = times * (high - low) + low
        return times

    def build(self):
        months = self.config["split_months"]
        if not months or self.benchmark_filename_list is not None:
            return super().build()
        if (not isinstance(months, (list, tuple)) or len(months) != 3
                or not all(isinstance(m, (int, float)) and m > 0 for m in months)):
            raise ConfigError(f"split_months: need three positive month counts [train, valid, test], got {months!r}")
        if self.time_field is None or self.time_field not in self.inter_feat:
            raise ConfigError(f"split_months: {self.dataset_name}.inter has no time field (TIME_FIELD)")
        self._change_feat_format()
        self.sort(by=self.time_field)
        times = self.raw_times()
        test_start = times.max() - months[2] * MONTH
        valid_start = test_start - months[1] * MONTH
        train_start = valid_start - months[0] * MONTH
        windows = [(train_start, valid_start), (valid_start, test_start), (test_start, np.inf)]
        datasets = []
        for (start, end), name in zip(windows, ("train", "valid", "test")):
            rows = np.flatnonzero((times >= start) & (times < end))
            if len(rows) == 0:
                raise ConfigError(f"split_months: the {name} window {months} holds no interaction")
            datasets.append(self.copy(self.inter_feat[torch.from_numpy(rows)]))
        return datasets

"""RecBole's ``Collector`` with user ids for per-user value metrics and exact multi-process evaluation.

RecBole 1.2.1 evaluates each rank's shard on its own and averages the per-rank metrics (``Trainer._map_reduce``):
a per-user metric such as UAUC then sees half of a user's rows on each rank, and the ``DistributedSampler``
of RecBole's eval loaders pads the last shard with a repeated sample. This collector records ``data.user``
(``USER_ID_FIELD`` of each row) when a metric needs it, and in a multi-process run drops the padding and
gathers every per-row tensor from all ranks before the metrics run: every rank computes each metric on every
row exactly once, and ``Trainer._map_reduce`` is skipped (``compat.apply()`` installs both).
"""
import torch
import torch.distributed as dist
from recbole.evaluator.collector import Collector as RecBoleCollector
from recbole.utils import EvaluatorType
from torch.utils.data.distributed import DistributedSampler

# Collected tensors with one entry per evaluated row (labeled) or per evaluated user / sequence (ranking).
ROW_KEYS = ("rec.items", "rec.topk", "rec.meanrank", "rec.score", "data.label", "data.user", "data.item")


class Collector(RecBoleCollector):
    def __init__(self, config):
        super().__init__(config)
        self.real_samples = None  # this rank's samples that are not padding; None: no gathering
        self.gathered = False  # the last data struct holds every rank's rows
        self.collect_items = False  # also record ``data.item`` (ITEM_ID_FIELD of each row; the warm / cold report)
        self.last_struct = None  # with collect_items: the last evaluation's collected rows, as given to the metrics
        self._next_sample = 0

    def begin(self, eval_data):
        """Called before each evaluation: under ``DistributedSampler`` note how many of this rank's samples are
        real (padded positions come last, so rank ``r`` has the ``len(range(r, N, world))`` first ones)."""
        sampler = getattr(eval_data, "sampler", None)
        self.gathered, self._next_sample = False, 0
        self.real_samples = None
        if isinstance(sampler, DistributedSampler) and dist.is_initialized():
            self.real_samples = len(range(sampler.rank, len(sampler.dataset), sampler.num_replicas))

    def eval_batch_collect(self, scores_tensor, interaction, positive_u, positive_i):
        super().eval_batch_collect(scores_tensor, interaction, positive_u, positive_i)
        if self.register.need("data.user"):
            self.data_struct.update_tensor("data.user", interaction[self.config["USER_ID_FIELD"]].to(self.device))
        if self.collect_items:
            self.data_struct.update_tensor("data.item", interaction[self.config["ITEM_ID_FIELD"]].to(self.device))
        if self.real_samples is not None:
            self.data_struct.update_tensor("data.sample", self._sample_of_rows(scores_tensor, positive_u))

    def _sample_of_rows(self, scores_tensor, positive_u):
        """The loader sample (a row, or a user with its negatives) of each collected row, counted on this rank."""
        rows = scores_tensor.shape[0]
        if self.config["eval_type"] == EvaluatorType.VALUE and positive_u is not None:
            # Negative-sampled value evaluation: a sample is a user's positives, each with its negatives.
            per_sample = torch.bincount(positive_u.cpu()) * (rows // len(positive_u))
            local = torch.repeat_interleave(torch.arange(len(per_sample)), per_sample)
            samples = len(per_sample)
        else:
            local, samples = torch.arange(rows), rows
        first, self._next_sample = self._next_sample, self._next_sample + samples
        return (local + first).to(self.device)

    def get_data_struct(self):
        if self.real_samples is not None:
            self._gather_real_rows()
        struct = super().get_data_struct()
        for key in ("data.user", "data.item", "data.sample"):
            if key in self.data_struct:
                del self.data_struct[key]
        if "data.sample" in struct:
            del struct["data.sample"]
        self.last_struct = struct if self.collect_items else None
        return struct

    def _gather_real_rows(self):
        """Every rank's rows without the sampler's padding, on every rank (same keys on all ranks: collectives)."""
        real = self.data_struct["data.sample"] < self.real_samples if "data.sample" in self.data_struct else None
        for key in ROW_KEYS:
            if not (self.register.need(key) or key == "data.item" and self.collect_items):
                continue
            mine = None
            if key in self.data_struct:
                mine = self.data_struct[key] if real is None else self.data_struct[key][real]
                mine = mine.cpu()
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, mine)
            shards = [shard for shard in shards if shard is not None]
            if shards:
                self.data_struct[key] = torch.cat(shards, dim=0)
        self.gathered = True

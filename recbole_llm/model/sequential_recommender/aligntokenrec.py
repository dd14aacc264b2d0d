r"""
AlignTokenRec
################################################

Reference:
    Guanghan Li et al. "Semantic Convergence: Harmonizing Recommender Systems via Two-Stage Alignment and
    Behavioral Semantic Tokenization." in AAAI 2025. (No public code.)

Stages, in the paper's order (each cached by ``StageCache``; 1-4, the alignment tokenization, live in
``recbole_llm/model/semantic_ids.py``, shared with TCA4Rec's ``item_identifier: semantic_id``):
  1. cf_pretrain             DCCF (or ``cf_backbone``) on the training split; its item embeddings Emb(r_i).
  2. codebook_init           the LLM embedding of every item, E^LLM: the LLM's input embeddings mean-pooled over
                             the item's title and description tokens; each codebook level initialised by k-means
                             on its input (level n on the residual of level n-1).
  3. alignment_tokenization  the codebooks train on L = L^B + L^L (eqs. 1-4): behaviour alignment (each level's
                             input to its chosen code) plus LLM alignment (each chosen code to E^LLM), in fp32.
  4. item_codes              each item's N codes; the collision rate is logged and collisions resolved (the item
                             closest to the shared last code keeps it, the others take their nearest free last-level
                             code under the same prefix), so every item has a unique sequence; the item trie.
  5. alignment_tasks         (the final stage, RecBole's loop) LoRA SFT of the LLM with N x C new code tokens on
                             the sequential, negative-behaviour, text and query tasks (templates in the YAML).
                             With ``tca_alpha > 0`` (plug-and-play, TCA4Rec's ``SoftLabelLoss`` from
                             ``llm/alignment.py``) the sequential task's code tokens take soft labels
                             q_t = (1 - tca_alpha) onehot(y_t) + tca_alpha P_cf,t, P_cf,t from the cf_pretrain
                             backbone's logits over the code trie's subtree (loss ``tca_loss``); other tasks keep
                             their one-hot labels. ``tca_temperature`` / ``tca_msl`` (TCA4Rec's temperature
                             and masked softmax over the trie's children) shape every answer's loss.
                             ``tca_alpha: 0`` with both off (default) is the plain SFT loss.
Inference: the LC-Rec prompt, beam search constrained to the item trie (every output is a real item), the beams'
items ranked first through ``recbole_llm.model.ranking`` (the rest tied below). ``recbole_llm.serve`` caches the
top-K per user and adds new items without retraining. ``exclude_seen_items: True`` leaves the user's seen items
(the row's history and training items; in ``recommend``, the given history) out of the beams through the trie
(off by default: RecBole masks no history for sequential models). ``cf_mask_history: True`` sets the teacher's
logits of the history items to -inf before TCA4Rec's soft labels (``tca_alpha > 0``; off by default).

Where the paper is silent, this implementation chooses:
  - E^LLM (width H) and the codes (width d of the CF embedding) differ in size: L^L compares a learned linear map
    of each chosen code, W B^n_{c*} + b (``llm_align``, trained with the codebooks), with E^LLM centred over the
    items (the mean-pooled embeddings share a large common component). The target is fixed: it cannot collapse.
  - Eq. 1 writes |E - B|; we use the signed residual E - B (the residual the text describes, as in RQ-VAE).
    Each level's input is detached: L^B trains level n's codes towards its input only.
  - Text: ``item_text_fields``' first field is the title, the rest joined is the description (ml-100k has no
    description: year and genres stand in). An item without text gets "item <token>".
  - Training prompts of the sequential task use the paper's wording and the LC-Rec inference wording, one drawn per
    sample (the model would never see the inference prompt otherwise). Negatives: ``neg_ratio`` negative prompts
    per sequential prompt, each an item the user never interacted with in the training split.
  - Sequential samples are RecBole's training rows (one per target item, history up to ``MAX_ITEM_LIST_LENGTH`` =
    20); ``seq_rows_per_user`` keeps each user's latest rows only: 1 by default, CPU-sized (the paper trains on
    every row, ``~``: ~25k steps of 16 on ml-100k, hours on a GPU, days on a 2-core CPU).
  - "ED" (``tokenization: ed``): an MLP encoder / decoder around the codebooks with RQ-VAE's reconstruction and
    commitment (0.25) losses added; "w/o AM" (``llm_alignment: False``): no L^L.
  - ``code_token_init: mlp2 | mlp3`` (Table 7): the code tokens' input rows are, at every forward, a 2- / 3-layer
    MLP (ReLU between) of each code's codebook vector; the MLP (seeded) and the vectors (a copy of the trained
    codebooks) train with the LoRA SFT, as the paper activates their gradients. The paper does not scale the rows:
    we standardise them to the embedding table's mean and spread (no parameter). The output rows stay peft
    trainable tokens, started from the MLP's first rows. ``none`` (the paper's default): the mean-resized rows.
  - Queries: one per review of a training interaction (never of a valid / test one, even for a repeated (user,
    item) pair), when ``review_text_field`` is in the .inter file; the review is cut at ``max_text_tokens``.
  - A new item: its CF embedding is quantized by the trained codebooks; with text only, its E^LLM is mapped to the
    CF space by a ridge regression fitted on the training items (stored with the codebooks).
"""
import csv
import logging
import os
import random
from collections import Counter

import numpy as np
import torch
from recbole.data.interaction import Interaction
from recbole.model.abstract_recommender import SequentialRecommender

from recbole_llm.data.prompts import PromptTemplate, collate
from recbole_llm.errors import ConfigError
from recbole_llm.llm import beam_search_items, load_llm
from recbole_llm.llm.alignment import SoftLabelLoss, answer_targets
from recbole_llm.llm.precision import autocast_context
from recbole_llm.llm.scoring import answer_batch, answer_logits, causal_lm_loss
from recbole_llm.model.abstract import LLMRecommender, TrainStage
from recbole_llm.model.backbone import CFBackbone
from recbole_llm.model.quantize import resolve_collisions
from recbole_llm.model.ranking import Ranking, TopKRanked
from recbole_llm.model.semantic_ids import SemanticIDs, code_tokens, item_texts

logger = logging.getLogger(__name__)

# The paper's ablations (Tables 3-5, 7) as config overrides.
ABLATIONS = {
    "default": {},
    "ed": {"tokenization": "ed"},
    "wo_am": {"llm_alignment": False},
    "wo_ns": {"neg_ratio": 0},
    **{f"nsr_1_{r}": {"neg_ratio": r} for r in range(5)},
    **{f"levels_{n}": {"codebook_levels": n} for n in range(2, 6)},
    "init_mlp2": {"code_token_init": "mlp2"},
    "init_mlp3": {"code_token_init": "mlp3"},
}


class AlignTokenRec(SemanticIDs, TopKRanked, LLMRecommender, SequentialRecommender):
    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self._check_options(config)

        # load parameters info
        self.neg_ratio = int(config["neg_ratio"])
        self.beam_size = int(config["beam_size"])
        self.tca_alpha = float(config["tca_alpha"] or 0)

        # item text (fails here, naming the field, if the dataset lacks it) and the training split
        self.titles, self.descriptions = item_texts(config, dataset)
        self._training_rows(dataset)
        self.reviews = self._training_reviews(config, dataset)
        if config["query_task"]:
            logger.info(f"query task: {len(self.reviews)} reviews of training interactions "
                        f"('{config['review_text_field']}' of the .inter file)")

        # the LLM with N x C new code tokens (trainable rows, saved with the LoRA adapters); stages 1-4
        levels, codes = int(config["codebook_levels"]), int(config["codebook_size"])
        self.llm, self.tokenizer = load_llm(config, new_tokens=code_tokens(levels, codes))
        self.cf = CFBackbone(config, dataset, config["cf_backbone"],  # the frozen backbone once stage 1 ran
                             mask_history=config["cf_mask_history"])
        self.init_semantic_ids(config, self.cf, (self.titles, self.descriptions))
        self.valid_items, self.decoded_items = 0, 0  # constrained decoding: valid items / decoded sequences

        # TCA4Rec's soft-label loss on the sequential task's code tokens (plug-and-play; its trie is set in stage 4)
        temperature, msl = config["tca_temperature"], bool(config["tca_msl"])
        plugged = self.tca_alpha > 0 or msl or temperature != 1
        self.alignment = SoftLabelLoss(None, self.tca_alpha, config["tca_loss"], temperature, msl,
                                       prefix="tca_") if plugged else None

        # templates (YAML)
        self.templates = {name: PromptTemplate(config[f"{name}_template"], self.tokenizer)
                          for name in ("text", "query", "neg", "inference")}
        self.seq_templates = [PromptTemplate(t, self.tokenizer) for t in config["seq_templates"]]
        self.sep_ids = self.tokenizer(config["history_separator"], add_special_tokens=False)["input_ids"]
        self.ranking = Ranking(config, dataset, self._score_rows, exclude_seen=config["exclude_seen_items"])
        self.requires_grad_(False)

    # ----- options and data ------------------------------------------------------------------------------------
    @staticmethod
    def _check_options(config):
        for key, low, high in (("beam_size", 1, None), ("neg_ratio", 0, None)):
            value = config[key]
            if not isinstance(value, int) or value < low or (high and value > high):
                raise ConfigError(f"{key}: must be an integer in [{low}, {high or 'inf'}], got {value!r}")
        alpha = config["tca_alpha"] or 0
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not 0 <= alpha <= 1:
            raise ConfigError(f"tca_alpha: must be a number in [0, 1], got {config['tca_alpha']!r}")
        for key in ("exclude_seen_items", "cf_mask_history"):
            if not isinstance(config[key], (bool, type(None))):  # None: a checkpoint saved before the option
                raise ConfigError(f"{key}: must be True or False, got {config[key]!r}")
        if config["MAX_ITEM_LIST_LENGTH"] > 20:
            logger.warning("MAX_ITEM_LIST_LENGTH > 20: the paper caps the history at 20 items")

    def _training_rows(self, dataset):
        """RecBole's training rows (history -> target) and each user's training items."""
        feat = dataset.inter_feat
        self.row_users = feat[self.USER_ID].numpy()
        self.row_targets = feat[self.ITEM_ID].numpy()
        lengths = feat[self.ITEM_SEQ_LEN].numpy()
        seqs = feat[self.ITEM_SEQ].numpy()
        self.row_histories = [seqs[r, :lengths[r]].tolist() for r in range(len(lengths))]
        self.user_items = [set() for _ in range(dataset.user_num)]
        for u, target, history in zip(self.row_users, self.row_targets, self.row_histories):
            self.user_items[u].add(int(target))
            self.user_items[u].update(history)
        limit = self.config["seq_rows_per_user"]
        order = np.argsort(self.row_users, kind="stable")  # rows of a user are in time order (RecBole sorts)
        keep, count = [], {}
        for r in order[::-1]:
            u = self.row_users[r]
            if limit is None or count.get(u, 0) < limit:
                keep.append(r)
                count[u] = count.get(u, 0) + 1
        self.seq_rows = sorted(keep)

    def _training_reviews(self, config, dataset):
        """(user, item, review) of each training interaction with a review, from ``review_text_field`` of the
        .inter file (read here: it stays out of ``load_col``).

        RecBole's sequential splits are time-ordered, so the training split holds each user's earliest
        interactions: a (user, item) pair that occurs k times in it (as a row's target, or as the first item of
        the user's history-of-one row, as RecBole's ``inter_matrix`` counts it) takes the reviews of its first k
        occurrences in time, never a later (valid / test) repeat's."""
        field = config["review_text_field"]
        path = os.path.join(config["data_path"], f"{config['dataset']}.inter")
        if not field or not os.path.isfile(path):
            return []
        train_counts = Counter(zip(self.row_users.tolist(), self.row_targets.tolist()))
        train_counts.update((u, h[0]) for u, h in zip(self.row_users.tolist(), self.row_histories) if len(h) == 1)
        with open(path, encoding=config["encoding"] or "utf-8", newline="") as f:
            reader = csv.reader(f, delimiter=config["field_separator"] or "\t")
            header = [c.split(":")[0] for c in next(reader)]
            if field not in header:
                return []
            cols = [header.index(name) for name in (self.USER_ID, self.ITEM_ID, field)]
            time_col = header.index(dataset.time_field) if dataset.time_field in header else None
            user_ids, item_ids = dataset.field2token_id[self.USER_ID], dataset.field2token_id[self.ITEM_ID]
            occurrences = []  # (user, time, line, item, review) of the pairs the training split holds
            for line, row in enumerate(reader):
                if len(row) <= max(cols + [time_col or 0]):
                    continue
                u, i = user_ids.get(row[cols[0]]), item_ids.get(row[cols[1]])
                if (u, i) in train_counts:
                    time = float(row[time_col]) if time_col is not None and row[time_col].strip() else 0.0
                    occurrences.append((u, time, line, i, row[cols[2]].strip()))
        reviews, taken = [], Counter()
        for u, _, _, i, review in sorted(occurrences):
            taken[u, i] += 1
            if taken[u, i] <= train_counts[u, i] and review:
                reviews.append((u, i, review))
        return reviews

    # ----- stages -------------------------------------------------------------------------------------------
    def stages(self):
        """Stages 1-4: cf_pretrain, codebook_init, alignment_tokenization, item_codes (``model/semantic_ids.py``)."""
        return self.semantic_id_stages()

    def final_stage(self):
        """Stage 5: LoRA SFT on the alignment tasks (LoRA, the code-token rows and, with ``code_token_init: mlp2 |
        mlp3``, the MLP and code vectors train), RecBole's loop."""
        return TrainStage("alignment_tasks", modules=self.fine_tuned_modules(), batches=self.task_batches,
                          loss=self.calculate_loss)

    # ----- prompts --------------------------------------------------------------------------------------------
    def history_ids(self, items):
        ids = []
        for n, item in enumerate(items[-self.max_seq_length:]):
            ids += (self.sep_ids if n else []) + self.item_token_ids(item)
        return ids

    def _text_ids(self, text):
        return self.tokenizer(text, add_special_tokens=False)["input_ids"][:self.config["max_text_tokens"]]

    def encode_sample(self, sample):
        """A sample (task, template index, history / item / review, target) -> prompt ids."""
        task, which, value = sample[:3]
        if task == "seq":
            return self.seq_templates[which].encode(history=self.history_ids(value))[0]
        if task == "neg":
            return self.templates["neg"].encode(history=self.history_ids(value))[0]
        if task == "text":
            return self.templates["text"].encode(title=self._text_ids(self.titles[value]),
                                                 description=self._text_ids(self.descriptions[value]))[0]
        return self.templates["query"].encode(query=self._text_ids(value))[0]

    # Stage 5 (final): alignment tasks.
    def task_batches(self, train_data, epoch):
        """One epoch of samples, shuffled: sequential rows, ``neg_ratio`` negatives each, every item's text task,
        the queries. A sample is (task, template index, input, target item, user)."""
        rng = random.Random(int(self.config["seed"]) * 1000 + 700 + epoch)
        samples = []
        for r in self.seq_rows:
            history, user = self.row_histories[r], self.row_users[r]
            samples.append(("seq", rng.randrange(len(self.seq_templates)), history, int(self.row_targets[r]), user))
            for _ in range(self.neg_ratio):
                samples.append(("neg", 0, history, self.negative_item(user, rng), user))
        if self.config["text_task"]:
            samples += [("text", 0, i, i, 0) for i in range(1, self.n_items)]
        if self.config["query_task"]:
            samples += [("query", 0, review, item, user) for user, item, review in self.reviews]
        rng.shuffle(samples)
        size = int(self.config["train_batch_size"])
        return [samples[i:i + size] for i in range(0, len(samples), size)]

    def negative_item(self, user, rng):
        """A uniformly drawn item the user never interacted with in the training split."""
        while True:
            item = rng.randrange(1, self.n_items)
            if item not in self.user_items[user]:
                return item

    def calculate_loss(self, batch):
        self.ranking.clear()  # RecBole's restore_* idiom: the weights are about to change
        prompts = [self.encode_sample(s) for s in batch]
        answers = [self.item_token_ids(s[3]) + [self.eos] for s in batch]
        if self.alignment is None:
            input_ids, attention, labels = answer_batch(prompts, answers, self.tokenizer.pad_token_id)
            return causal_lm_loss(self.llm, input_ids.to(self.device), attention.to(self.device),
                                  labels.to(self.device))
        # TCA4Rec's soft labels on the sequential task's code tokens (the backbone as teacher), one-hot elsewhere
        logits = answer_logits(self.llm, prompts, answers, self.tokenizer.pad_token_id, self.device)
        soft = torch.tensor([s[0] == "seq" for s in batch])
        cf_scores = torch.zeros(len(batch), self.n_items, device=self.device)
        if soft.any() and self.alignment.alpha > 0:
            rows = [s for s in batch if s[0] == "seq"]
            cf_scores[soft.to(self.device)] = self.teacher_logits([s[4] for s in rows], [s[2] for s in rows])
        return self.alignment(logits, answer_targets(answers).to(self.device), cf_scores, soft.to(self.device))

    def teacher_logits(self, users, histories):
        """The backbone's item scores (B, n_items) for training rows given as users and histories (RecBole's
        ``full_sort_predict`` on an Interaction with the user and, for a sequential backbone, the history)."""
        seqs = torch.zeros(len(histories), self.max_seq_length, dtype=torch.long)
        for row, history in enumerate(histories):
            history = history[-self.max_seq_length:]
            seqs[row, :len(history)] = torch.tensor(history)
        lengths = torch.tensor([min(len(h), self.max_seq_length) for h in histories])
        batch = Interaction({self.USER_ID: torch.as_tensor(users), self.ITEM_SEQ: seqs, self.ITEM_SEQ_LEN: lengths})
        return self.cf.logits(batch).float()

    # ----- inference -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def recommend(self, histories, k=None, constrained=True, exclude=None):
        """Top-k items (B, k) and sequence log-probabilities (B, k) of the LC-Rec prompt over each history, by
        beam search (max(``beam_size``, k) beams) constrained to the trie (or free: invalid sequences give item 0).

        ``exclude`` (B, n bool by item id): items each row's beams leave out (constrained only). By default, with
        ``exclude_seen_items``, the items of each history."""
        k = k or self.beam_size
        if exclude is None and self.ranking.exclude_seen:
            width = self.n_items + len(self.new_item_codes)
            exclude = torch.zeros(len(histories), width, dtype=torch.bool)
            for row, history in enumerate(histories):
                exclude[row, list(history)] = True
            exclude[:, 0] = True
        beams = max(self.beam_size, k)
        encoded = [(self.templates["inference"].encode(history=self.history_ids(h))[0], [], {}) for h in histories]
        input_ids, attention, _, _, _ = collate(encoded, self.tokenizer.pad_token_id, "left")
        input_ids, attention = input_ids.to(self.device), attention.to(self.device)
        with autocast_context(self.device, self.llm_dtype, self.config["llm_autocast"]):
            if constrained:
                items, scores = beam_search_items(self.llm, self.trie, input_ids, attention, beams, k,
                                                  exclude=None if exclude is None else exclude.to(self.device))
            else:
                from recbole_llm.llm import beam_search

                tokens, scores = beam_search(self.llm, input_ids, attention, beams, k, self.levels + 1, eos_id=self.eos)
                items = self.trie.items_of(tokens.flatten(0, 1)).view(scores.shape)
        self.valid_items += int((items > 0).sum())
        self.decoded_items += items.numel()
        return items, scores

    def _score_rows(self, batch, exclude):
        """``Ranking``'s scorer: the beams' items in order (no dense fallback); with ``exclude_seen_items`` the
        beams leave ``exclude`` out (the row's history and the user's training items)."""
        seqs, lens = batch[self.ITEM_SEQ].tolist(), batch[self.ITEM_SEQ_LEN].tolist()
        items, _ = self.recommend([s[:n] for s, n in zip(seqs, lens)],
                                  exclude=exclude if self.ranking.exclude_seen else None)
        return items, None

    # ----- new items (no retraining) ----------------------------------------------------------------------------
    @torch.no_grad()
    def codes_for(self, embedding=None, text=None):
        """Codes (N,) of a new item from the trained codebooks: its CF embedding (d,), or, for an item without
        interactions, its text (E^LLM mapped to the CF space by the ridge map); unique among the known items."""
        if embedding is None:
            if text is None:
                raise ConfigError("new item: give its CF embedding or its text")
            llm_emb = self.item_llm_embeddings(texts=[text]).to(self.text_to_cf.device)
            embedding = torch.cat([llm_emb, llm_emb.new_ones(1, 1)], 1) @ self.text_to_cf
        x = embedding.reshape(1, -1).to(self.item_emb.device, torch.float32)
        codes, _, _, distances = self.quantizer(x)
        known = torch.cat([self.item_codes[1:].cpu()] + [c.view(1, -1) for c in self.new_item_codes.values()])
        all_codes = torch.cat([known, codes.cpu()])
        distances = torch.cat([distances.new_zeros(len(known), distances.shape[1]), distances]).cpu()
        return resolve_collisions(all_codes, distances, first_free_from=len(known))[-1]

    def add_item(self, codes):
        """Add a new item with ``codes`` (from ``codes_for``) to the trie: it can be recommended at once.
        Returns its internal id (``n_items`` and up)."""
        item = self.n_items + len(self.new_item_codes)
        self.new_item_codes[item] = torch.as_tensor(codes, dtype=torch.long).cpu()
        self.trie.add(item, self.item_token_ids(item))
        self.ranking.clear()
        return item

"""TCA4Rec: Token-level Collaborative Alignment for LLM-based Generative Recommendation (Lin et al., 2026,
arXiv:2601.18457). The method as the authors' code realises it (see ``recbole_llm/llm/alignment.py``).

Base generative recommender (BIGRec / TALLRec style, usable alone with ``alpha: 0``): a LoRA-tuned LLM reads an
instruction and the user's last ``history_len`` item titles, one per line (most recent last), and writes the next
item's title and a line break. Titles are made unique (a repeated title gets `` (2)``, `` (3)``...), so a title is
an item. The items are written in the answer turn of the chat, one per line, each ending with the line break (the
trie's end marker): the prompt for a target is exactly the start of the user's item list, so a whole user's list
is one training sequence (``train_format: packed``) in which every item after the first is a target.

Stages:
  1. cf_pretrain              (alpha > 0) the CF backbone (``cf_backbone``: SASRec | MF | LightGCN | DCCF) trained
                              by RecBole on the training split, frozen: item logits s_u per training row
                              (``model/backbone.py``; cached and shared with every model over that backbone).
                              A sequential teacher reads RecBole's item list of the row, ``MAX_ITEM_LIST_LENGTH``
                              = 10 by default: the prompt's last ``history_len`` = 10 items, as the reference's
                              SASRec (maxlen 10).
  2. soft_label_alignment     (the final stage, RecBole's loop) LoRA on the LLM with the soft next-token loss:
                              collaborative tokenizer P_cf,t from s_u over the trie subtree of the ground-truth
                              prefix, label q_t = (1 - alpha) onehot(y_t) + alpha P_cf,t, loss ``tca_loss``
                              (``mixture``: -log sum_v q_t,v p_t,v, the reference code; ``soft_ce``: -sum_v
                              q_t,v log p_t,v, the paper's formula); ``temperature`` and ``msl`` (masked softmax
                              over the trie's children) shape p_t. alpha = 0 is plain next-token prediction.
                              Targets: RecBole's training rows, one per target (every row by default, as the
                              reference; ``train_rows_per_user: n`` keeps each user's last n). ``train_format``:
                              ``packed`` (``trainer/packed.py``: a user's items once, chunks of ``chunk_items``
                              targets, ``packed_window`` the paper's history window) or ``rows`` (one prompt per
                              target). The teacher reads each target's RecBole row in both.

Inference: beam search constrained by the item trie (``num_beams`` >= max(topk)) gives every user its top
``num_beams`` real items in order; RecBole's full-ranking evaluator ranks them first, every other item tied below
(``model/ranking.py``, keyed by user and history: a user's validation and test rows are two entries). Beams are
scored on the LLM's raw log-probabilities (``temperature`` and ``msl`` shape the training loss only; the trie
already restricts every step to real items). ``exclude_seen_items: True`` leaves the user's seen items (the
row's history and the user's training items: what RecBole masks for a general model) out of the beams, through
the trie, and scores them -inf; off by default: RecBole masks no history for sequential models (SASRec's rule).
``cf_mask_history: True`` sets the teacher's logits of the row's history items to -inf before P_cf,t (the
reference softmaxes the raw logits: off by default).

Item identifiers (``item_identifier``):
  - ``title``: the unique titles above, a trie over their tokens.
  - ``semantic_id``: AlignTokenRec's alignment tokenization (``model/semantic_ids.py``, the same code): N x C new
    code tokens; stages cf_pretrain of ``codebook_backbone`` (DCCF, as AlignTokenRec; shared with the teacher's
    stage when they are the same model), codebook_init, alignment_tokenization and item_codes run before the final
    stage. The prompt shows the history items' code tokens, the target is the next item's N codes then EOS, and the
    trie is over code sequences: the collaborative tokenizer's P_cf,t works unchanged (the subtree under the
    ground-truth code prefix).
"""
import numpy as np
import pandas as pd
import torch
from recbole.model.abstract_recommender import SequentialRecommender
from recbole.utils import InputType

from recbole_llm.data.item_text import load_item_texts
from recbole_llm.data.prompts import collate
from recbole_llm.errors import ConfigError
from recbole_llm.llm import ItemTrie, beam_search_items, load_llm
from recbole_llm.llm.alignment import SoftLabelLoss, answer_targets
from recbole_llm.llm.generation import chat_prompt
from recbole_llm.llm.precision import autocast_context
from recbole_llm.llm.scoring import answer_logits
from recbole_llm.model.abstract import LLMRecommender, TrainStage
from recbole_llm.model.backbone import CFBackbone
from recbole_llm.model.ranking import Ranking, TopKRanked
from recbole_llm.model.semantic_ids import SemanticIDs, code_tokens, item_texts
from recbole_llm.trainer.packed import (PackedBatch, PackedBatches, batch_chunks, collate_packed, pack,
                                        packed_answer_logits, user_chunks)

BACKBONES = {"SASRec": "SASRec", "MF": "BPR", "BPR": "BPR", "LightGCN": "LightGCN", "DCCF": "DCCF"}
IDENTIFIERS = ("title", "semantic_id")
IDENTIFIER_WORDS = {"title": "title", "semantic_id": "item code"}  # {identifier} in the prompts
TRAIN_FORMATS = ("packed", "rows")
LINE_BREAK = "\n"  # ends every item: the trie's end marker


def unique_titles(titles, ids):
    """Titles made distinct: a repeated title gets `` (2)``, `` (3)``...; an empty one is ``item <id>``."""
    seen, out = set(), []
    for title, token in zip(titles, ids):
        title = " ".join(title.split()) or f"item {token}"
        candidate, n = title, 1
        while candidate in seen:
            n += 1
            candidate = f"{title} ({n})"
        seen.add(candidate)
        out.append(candidate)
    return out


class TCA4Rec(SemanticIDs, TopKRanked, LLMRecommender, SequentialRecommender):
    input_type = InputType.POINTWISE

    def __init__(self, config, dataset):
        super().__init__(config, dataset)
        self.config = config
        self._check_options(config)

        # load parameters info
        self.history_len = int(config["history_len"])
        self.num_beams = int(config["num_beams"])
        self.alpha = float(config["alpha"])
        self.identifier = config["item_identifier"]

        # the CF backbone: the collaborative tokenizer's teacher
        self.cf = CFBackbone(config, dataset, BACKBONES[config["cf_backbone"]],
                             mask_history=config["cf_mask_history"]) if self.alpha > 0 else None

        # the LLM with LoRA, and the items as token sequences in a trie (each ends with a line break)
        if self.identifier == "title":  # unique titles
            self.llm, self.tokenizer = load_llm(config)
            self.end_id = self._line_break_id()
            fields = config["title_fields"] or list(config["item_text_fields"] or [])[:1]
            texts = load_item_texts(config, dataset, fields=fields)
            self.titles = [""] + unique_titles(texts[1:], dataset.field2id_token[self.ITEM_ID][1:])
            ids = self.tokenizer(self.titles[1:], add_special_tokens=False)["input_ids"]
            self.trie = ItemTrie(dict(zip(range(1, self.n_items), ids)), self.end_id)
        else:  # AlignTokenRec's semantic IDs: N x C new code tokens; the trie once the item_codes stage ran
            levels, codes = int(config["codebook_levels"]), int(config["codebook_size"])
            self.llm, self.tokenizer = load_llm(config, new_tokens=code_tokens(levels, codes))
            self.end_id = self._line_break_id()
            name = BACKBONES.get(config["codebook_backbone"], config["codebook_backbone"])
            same = self.cf is not None and self.cf.name == name
            self.init_semantic_ids(config, self.cf if same else CFBackbone(config, dataset, name),
                                   item_texts(config, dataset))
            self.eos = self.end_id  # the code trie's end marker (item_codes stage): a line break, as for titles
        word = IDENTIFIER_WORDS[self.identifier]
        system = config["system_prompt"] and config["system_prompt"].replace("{identifier}", word)
        if "{history}" in config["prompt"]:
            raise ConfigError("prompt: the history items follow the prompt, one per line, in the answer turn: "
                              "remove {history}")
        prompt = chat_prompt(self.tokenizer, config["prompt"].replace("{identifier}", word), system)
        self.prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self._chunks = None  # packed training: the users' chunks, built once from the training split

        # the soft-label loss
        self.alignment = SoftLabelLoss(self.trie, self.alpha, config["tca_loss"], config["temperature"],
                                       config["msl"])
        self.ranking = Ranking(config, dataset, self._score, exclude_seen=config["exclude_seen_items"])  # top-K
        # cache, cleared in calculate_loss; exclude_seen_items: beams leave the user's seen items out
        self.requires_grad_(False)

    def _line_break_id(self):
        ids = self.tokenizer(LINE_BREAK, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ConfigError(f"llm_path: TCA4Rec ends each item with a line break, which this tokenizer writes as "
                              f"{len(ids)} tokens")
        return ids[0]

    @staticmethod
    def _check_options(config):
        if config["train_format"] not in TRAIN_FORMATS:
            raise ConfigError(f"train_format: unknown '{config['train_format']}' (choose from "
                              f"{', '.join(TRAIN_FORMATS)})")
        if not isinstance(config["chunk_items"], int) or config["chunk_items"] < 1:
            raise ConfigError(f"chunk_items: must be a positive integer, got {config['chunk_items']!r}")
        penalty = config["length_penalty"]
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty < 0:
            raise ConfigError(f"length_penalty: must be a number >= 0, got {penalty!r}")
        if not isinstance(config["packed_window"], bool):
            raise ConfigError(f"packed_window: must be True or False, got {config['packed_window']!r}")
        if config["item_identifier"] not in IDENTIFIERS:
            raise ConfigError(f"item_identifier: unknown '{config['item_identifier']}' (choose from "
                              f"{', '.join(IDENTIFIERS)})")
        if config["cf_backbone"] not in BACKBONES:
            raise ConfigError(f"cf_backbone: unknown '{config['cf_backbone']}' (choose from SASRec, MF, LightGCN, "
                              "DCCF)")
        for key in ("history_len", "num_beams"):
            if not isinstance(config[key], int) or config[key] < 1:
                raise ConfigError(f"{key}: must be a positive integer, got {config[key]!r}")
        if config["history_len"] > config["MAX_ITEM_LIST_LENGTH"]:
            raise ConfigError(f"history_len: {config['history_len']} items per prompt, but RecBole keeps "
                              f"MAX_ITEM_LIST_LENGTH={config['MAX_ITEM_LIST_LENGTH']} per row (raise it)")
        if config["num_beams"] < max(config["topk"]):
            raise ConfigError(f"num_beams: {config['num_beams']} beams rank fewer items than topk "
                              f"{max(config['topk'])}")
        rows = config["train_rows_per_user"]
        if rows is not None and (not isinstance(rows, int) or rows < 1):
            raise ConfigError(f"train_rows_per_user: must be a positive integer or ~ (all rows), got {rows!r}")
        if not isinstance(config["cf_mask_history"], (bool, type(None))):  # None: a checkpoint before the option
            raise ConfigError(f"cf_mask_history: must be True or False, got {config['cf_mask_history']!r}")

    # ----- stages -------------------------------------------------------------------------------------------
    def stages(self):
        if self.identifier == "title":
            return [] if self.cf is None else [self.cf.stage()]  # 1. cf_pretrain
        # semantic IDs: the codebook backbone's item embeddings, then the codebook stages (model/semantic_ids.py)
        if self.code_cf is self.cf:
            backbone = [self.cf.stage(on_load=self.load_cf)]
        else:
            backbone = [] if self.cf is None else [self.cf.stage()]
            backbone.append(self.code_cf.stage(on_load=self.load_cf, name="codebook_cf_pretrain",
                                               backbone_key="codebook_backbone"))
        return backbone + self.semantic_id_stages(backbone_stage=False)

    def final_stage(self):
        """2. Soft label alignment: LoRA trained by RecBole's loop (validation, early stopping)."""
        if self.config["train_format"] == "packed":
            batches = self.packed_batches
        else:
            batches = None if self.config["train_rows_per_user"] is None else self.train_batches
        return TrainStage("soft_label_alignment", modules=self.fine_tuned_modules(), batches=batches,
                          loss=self.calculate_loss)

    def packed_batches(self, train_data, epoch):
        """Packed training (``trainer/packed.py``): chunks of users' item lists, shuffled, ~``train_batch_size``
        targets a batch."""
        feat = train_data._dataset.inter_feat
        if self._chunks is None or self._chunks[0] is not feat:
            self._chunks = (feat, user_chunks(feat, self.USER_ID, self.POS_ITEM_ID, self.ITEM_SEQ, self.ITEM_SEQ_LEN,
                                              self.config["chunk_items"], self.history_len,
                                              self.config["train_rows_per_user"]))
        feat, chunks = self._chunks
        window = bool(self.config["packed_window"])
        groups = batch_chunks(chunks, self.config["train_batch_size"], self.config["seed"] * 1000 + epoch)
        return PackedBatches(groups, lambda group: collate_packed(
            [pack(chunks[i], self.prompt_ids, self.trie.tokens, self.history_len, window) for i in group],
            self.tokenizer.pad_token_id))

    def train_batches(self, train_data, epoch):
        """Each user's last ``train_rows_per_user`` training rows (of RecBole's one row per target), shuffled."""
        feat = train_data._dataset.inter_feat
        users = feat[self.USER_ID].numpy()
        rows = np.flatnonzero(pd.Series(users).groupby(users).cumcount(ascending=False).to_numpy()
                              < self.config["train_rows_per_user"])
        np.random.default_rng(self.config["seed"] * 1000 + epoch).shuffle(rows)
        size = self.config["train_batch_size"]
        return [feat[torch.from_numpy(rows[i:i + size])] for i in range(0, len(rows), size)]

    # ----- prompts and the soft-label loss ------------------------------------------------------------------
    def prompts(self, interaction):
        """Token ids of each row's prompt: the instruction, then its last ``history_len`` items, most recent last,
        each as the trie writes it (its tokens and the line break)."""
        seqs, lens = interaction[self.ITEM_SEQ].tolist(), interaction[self.ITEM_SEQ_LEN].tolist()
        return [self.prompt_ids + [t for i in seq[:n][-self.history_len:] for t in self.trie.tokens(i)]
                for seq, n in zip(seqs, lens)]

    def calculate_loss(self, interaction):
        """The soft-label loss over a batch of RecBole rows (Interaction) or of packed chunks (PackedBatch)."""
        self.ranking.clear()  # RecBole's restore_* idiom: the weights are about to change
        if isinstance(interaction, PackedBatch):
            batch = interaction.to(self.device)
            logits, targets = packed_answer_logits(self.llm, batch), batch.targets
            interaction = self._chunks[0][batch.rows.cpu()]  # each target's RecBole row: the teacher's input
        else:
            answers = [self.trie.tokens(i) for i in interaction[self.POS_ITEM_ID].tolist()]  # tokens + end marker
            logits = answer_logits(self.llm, self.prompts(interaction), answers, self.tokenizer.pad_token_id,
                                   self.device)
            targets = answer_targets(answers).to(self.device)
        cf_scores = self.cf.logits(interaction) if self.cf is not None else None  # s_u (B, n_items)
        return self.alignment(logits, targets, cf_scores)  # q_t and soft NTP

    # ----- inference ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def _score(self, batch, exclude):
        """``Ranking``'s scorer: each row's top ``num_beams`` items by trie-constrained beam search (leaving out
        ``exclude``, the user's seen items, with ``exclude_seen_items``)."""
        input_ids, attention, _, _, _ = collate([(p, [], {}) for p in self.prompts(batch)],
                                                self.tokenizer.pad_token_id, "left")
        with autocast_context(self.device, self.llm_dtype, self.config["llm_autocast"]):
            items, _ = beam_search_items(self.llm, self.trie, input_ids.to(self.device), attention.to(self.device),
                                         num_beams=self.num_beams,
                                         exclude=exclude if self.ranking.exclude_seen else None,
                                         length_penalty=float(self.config["length_penalty"]))
        return items, None

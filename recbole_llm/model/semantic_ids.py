r"""Semantic IDs: items as sequences of N learned codes, one new LLM token per (level, code), from AlignTokenRec's
alignment tokenization (Li et al., AAAI 2025). One home for every model that identifies items by codes:
AlignTokenRec, and TCA4Rec with ``item_identifier: semantic_id``.

    class MyModel(SemanticIDs, TopKRanked, LLMRecommender, SequentialRecommender):
        def __init__(self, config, dataset):
            ...
            self.llm, self.tokenizer = load_llm(config, new_tokens=code_tokens(levels, codes))
            self.init_semantic_ids(config, CFBackbone(config, dataset, "DCCF"), item_texts(config, dataset))

        def stages(self):
            return self.semantic_id_stages()  # + the model's own

Stages (``semantic_id_stages``), each cached by ``StageCache``:
  1. cf_pretrain             the CF backbone (DCCF in the paper) on the training split; its item embeddings Emb(r_i).
  2. codebook_init           E^LLM of every item: the LLM's input embeddings mean-pooled over the item's title and
                             description tokens; each codebook level initialised by k-means on its input (level n on
                             the residual of level n-1); a ridge map E^LLM -> CF space for items with text only.
  3. alignment_tokenization  the codebooks train on L = L^B + L^L (eqs. 1-4): behaviour alignment (each level's
                             input to its chosen code) plus LLM alignment (a linear map of each chosen code,
                             ``llm_align``, to the centred E^LLM), in fp32; ``tokenization: ed`` adds RQ-VAE's
                             reconstruction and commitment losses; ``llm_alignment: False`` drops L^L ("w/o AM").
  4. item_codes              each item's N codes; the collision rate is logged and collisions resolved (the item
                             closest to the shared last code keeps it, the others take their nearest free last-level
                             code under the same prefix): every item has a unique sequence. Then the item trie over
                             the code-token sequences (each ends with EOS), and ``code_token_init`` (Table 7).

``code_token_init: mlp2 | mlp3`` (Table 7, "MLP-ReLU-MLP" / "MLP-ReLU-MLP-ReLU-MLP" from the codebook vectors to
the LLM's width, "the gradients of these modules and the CodeBook embeddings will be activated during the
fine-tuning phase"): ``CodeEmbedding`` holds the MLP and a copy of the codebook vectors (set from the trained
codebooks in stage 4), and at every forward a hook on the LLM's input embedding gives the code tokens its rows.
The model's final stage trains it with the LLM (``fine_tuned_modules``); it is saved in the model's state dict.
``none`` (the paper's default): the new rows are the mean-resized rows, trained as peft trainable tokens.

Options (the model's YAML): ``codebook_levels`` (N), ``codebook_size`` (C), ``codebook_distance``, ``tokenization``,
``llm_alignment``, ``kmeans_iters``, ``codebook_epochs``, ``codebook_learning_rate``, ``codebook_batch_size``,
``ridge_lambda``, ``max_text_tokens``, ``code_token_init``.
"""
import logging

import torch
from torch import nn

from recbole_llm.data.item_text import load_item_texts
from recbole_llm.errors import ConfigError
from recbole_llm.llm import ItemTrie
from recbole_llm.llm.inputs import input_embedding
from recbole_llm.llm.scoring import encode_texts
from recbole_llm.model.quantize import ResidualQuantizer, collision_rate, paired_distance, resolve_collisions
from recbole_llm.stages import Stage, TrainStage

logger = logging.getLogger(__name__)

TOKEN_INITS = ("none", "mlp2", "mlp3")
TOKENIZATIONS = ("align", "ed")
# Config values the codebooks depend on (stages 2-4; the backbone enters through the parent stage's key).
TOKENIZATION_KEYS = ["codebook_levels", "codebook_size", "codebook_distance", "tokenization", "kmeans_iters",
                     "item_text_fields", "item_text_separator"]


def code_tokens(levels, codes):
    """The N x C new tokens, LC-Rec style: ``<a_0>`` .. for level 0, ``<b_0>`` .. for level 1, ..."""
    return [f"<{chr(ord('a') + n)}_{c}>" for n in range(levels) for c in range(codes)]


def item_texts(config, dataset):
    """(titles, descriptions) per internal item id: ``item_text_fields``' first field is the title, the rest joined
    the description (ml-100k has no description: year and genres stand in); no text gives ``item <token>``."""
    texts = load_item_texts(config, dataset, separator="\t")
    tokens = dataset.field2id_token[dataset.iid_field]
    titles = [t.split("\t")[0] if t else f"item {tokens[i]}" for i, t in enumerate(texts)]
    return titles, [", ".join(t.split("\t")[1:]) for t in texts]


def check_semantic_id_options(config):
    if config["tokenization"] not in TOKENIZATIONS:
        raise ConfigError(f"tokenization: unknown '{config['tokenization']}' (choose from align, ed)")
    if config["code_token_init"] not in TOKEN_INITS:
        raise ConfigError(f"code_token_init: unknown '{config['code_token_init']}' "
                          f"(choose from {', '.join(TOKEN_INITS)})")
    for key, low, high in (("codebook_levels", 1, 26), ("codebook_size", 2, None)):
        value = config[key]
        if not isinstance(value, int) or value < low or (high and value > high):
            raise ConfigError(f"{key}: must be an integer in [{low}, {high or 'inf'}], got {value!r}")


class SemanticIDs:
    """Mixin of an ``LLMRecommender``: the codebook stages, each item's code tokens and the trie over them.

    The model sets ``self.llm`` / ``self.tokenizer`` (loaded with ``code_tokens``) and calls
    ``init_semantic_ids``. A model with a ``SoftLabelLoss`` in ``self.alignment`` gets its trie set too.
    """

    other_parameter_name = ["collision_rate"]  # saved with the checkpoint (RecBole's other_parameter)
    trie = None
    collision_rate = None

    def init_semantic_ids(self, config, backbone, texts):
        """``backbone``: the ``CFBackbone`` whose item embeddings are quantized; ``texts``: (titles,
        descriptions) as ``item_texts`` gives them."""
        check_semantic_id_options(config)
        self.levels, self.n_codes = int(config["codebook_levels"]), int(config["codebook_size"])
        self.distance = config["codebook_distance"]
        self.llm_alignment = bool(config["llm_alignment"])
        self.code_ids = torch.tensor(self.tokenizer.convert_tokens_to_ids(code_tokens(self.levels, self.n_codes)))
        self.code_ids = self.code_ids.view(self.levels, self.n_codes)
        self.eos = self.tokenizer.eos_token_id
        self.code_texts = [f"{t} {d}".strip() for t, d in zip(*texts)]

        # define layers: CF embeddings, codebooks, the LLM-alignment target, codes per item
        self.code_cf = backbone
        self.cf_dim = cf_dim = backbone.embedding_size
        hidden = input_embedding(self.llm).weight.shape[1]
        self.register_buffer("item_emb", torch.zeros(self.n_items, cf_dim))
        self.register_buffer("llm_emb", torch.zeros(self.n_items, hidden), persistent=False)  # E^LLM, stage 3 only
        self.register_buffer("text_to_cf", torch.zeros(hidden + 1, cf_dim))  # ridge map E^LLM (+ 1) -> CF space
        self.register_buffer("item_codes", torch.zeros(self.n_items, self.levels, dtype=torch.long))
        self.quantizer = ResidualQuantizer(cf_dim, self.levels, self.n_codes, self.distance,
                                           encoder_decoder=config["tokenization"] == "ed")
        self.llm_align = nn.Linear(cf_dim, hidden)  # codes -> LLM input space, for L^L
        self.trie = None
        self.collision_rate = None
        self.new_item_codes = {}  # items added after training (internal ids from n_items on): their codes

        # Table 7: the code tokens' input rows from a trained MLP of the codebook vectors (none: no module)
        self.code_embedding = None
        if config["code_token_init"] != "none":
            first = int(self.code_ids.min())
            if not torch.equal(self.code_ids.flatten(), torch.arange(first, first + self.code_ids.numel())):
                raise ConfigError("code_token_init: the code tokens must have consecutive ids (the tokenizer "
                                  "already knew some of them)")
            self.first_code_id = first
            table = input_embedding(self.llm).weight.detach().float()
            with torch.random.fork_rng():
                torch.manual_seed(config["seed"])
                self.code_embedding = CodeEmbedding(self.levels * self.n_codes, cf_dim, hidden,
                                                    int(config["code_token_init"][-1]), float(table.mean()),
                                                    float(table.std()))
            input_embedding(self.llm).register_forward_hook(self._code_rows_hook)

    def semantic_id_stages(self, backbone_stage=True):
        """Stages 1-4 (``backbone_stage=False``: the model declares the backbone's stage itself, loading it with
        ``on_load=self.load_cf``)."""
        first = [self.code_cf.stage(on_load=self.load_cf)] if backbone_stage else []
        return first + [
            Stage("codebook_init", self.init_codebooks, self.load_codebooks, TOKENIZATION_KEYS, uses_llm=True),
            TrainStage("alignment_tokenization", modules=["quantizer", "llm_align"], batches=self.item_batches,
                       loss=self.tokenization_loss, epochs="codebook_epochs", learning_rate="codebook_learning_rate",
                       uses_llm=False, config_keys=TOKENIZATION_KEYS + ["llm_alignment", "codebook_batch_size"]),
            Stage("item_codes", self.assign_codes, self.load_codes, TOKENIZATION_KEYS),
        ]

    # Stage 1: the CF backbone's item embeddings, Emb(r_i) (``model/backbone.py``).
    def load_cf(self):
        self.item_emb.copy_(self.code_cf.embeddings()[1])

    # Stage 2: E^LLM (centred), the text -> CF map, k-means initialisation of each level.
    def item_llm_embeddings(self, items=None, texts=None):
        """E^LLM: mean of the LLM's input embeddings over the tokens of each item's title and description."""
        if texts is None:
            texts = [self.code_texts[i] for i in items]
        return encode_texts(self.llm, self.tokenizer, texts, layer="input", show_progress=False,
                            max_length=self.config["max_text_tokens"])

    def init_codebooks(self, trainer, train_data, valid_data):
        items = torch.arange(1, self.n_items)
        llm_emb = self.item_llm_embeddings(items.tolist())
        cf = self.item_emb[items].cpu()
        x = torch.cat([llm_emb, torch.ones(len(llm_emb), 1)], 1)  # ridge: E^LLM -> Emb(r_i), for text-only items
        ridge = torch.linalg.solve(x.T @ x + float(self.config["ridge_lambda"]) * torch.eye(x.shape[1]), x.T @ cf)
        with torch.random.fork_rng():
            torch.manual_seed(self.config["seed"])
            quantizer = ResidualQuantizer(self.cf_dim, self.levels, self.n_codes, self.distance,
                                          encoder_decoder=self.quantizer.encoder is not None)
            quantizer.init_kmeans(cf, int(self.config["kmeans_iters"]), seed=int(self.config["seed"]))
        centred = torch.cat([torch.zeros(1, llm_emb.shape[1]), llm_emb - llm_emb.mean(0)])
        return {"quantizer": quantizer.state_dict(), "llm_emb": centred, "text_to_cf": ridge}

    def load_codebooks(self, artifact):
        self.quantizer.load_state_dict(artifact["quantizer"])
        self.llm_emb = artifact["llm_emb"].to(self.item_emb.device)
        self.text_to_cf.copy_(artifact["text_to_cf"])

    # Stage 3: the codebooks train on L^B + L^L (eqs. 1-4), in fp32.
    def item_batches(self, train_data, epoch):
        generator = torch.Generator().manual_seed(int(self.config["seed"]) * 1000 + epoch)
        items = torch.randperm(self.n_items - 1, generator=generator) + 1
        return list(items.split(int(self.config["codebook_batch_size"])))

    def tokenization_loss(self, items):
        """(L^B, L^L[, L^rec]) averaged over the batch's items, each summed over the N levels (eq. 3)."""
        items = items.to(self.device)
        x = self.item_emb[items]
        _, inputs, chosen, _ = self.quantizer(x)
        behaviour = paired_distance(inputs.detach(), chosen, self.distance).sum(1).mean()  # L^B
        target = self.llm_emb[items].unsqueeze(1).expand(-1, self.levels, -1)
        llm = paired_distance(self.llm_align(chosen), target, self.distance).sum(1).mean()  # L^L
        if not self.llm_alignment:
            llm = llm.detach()  # w/o AM: reported, not trained
        losses = (behaviour, llm)
        if self.quantizer.decoder is not None:  # ED: RQ-VAE's commitment and reconstruction
            commit = paired_distance(inputs, chosen.detach(), self.distance).sum(1).mean()
            quantized = inputs[:, 0] + (chosen.sum(1) - inputs[:, 0]).detach()  # straight-through
            recon = (self.quantizer.decoder(quantized) - x).pow(2).sum(-1).mean()
            losses += (0.25 * commit + recon,)
        return losses

    # Stage 4: codes per item, collisions resolved; the trie.
    @torch.no_grad()
    def assign_codes(self, trainer, train_data, valid_data):
        codes, _, _, distances = self.quantizer(self.item_emb[1:])
        rate = collision_rate(codes)
        unique = resolve_collisions(codes.cpu(), distances.cpu())
        logger.info(f"alignment tokenization: {self.levels} x {self.n_codes} codes, collision rate "
                    f"{100 * rate:.2f}% before resolution, {len(unique)} unique sequences")
        return {"codes": torch.cat([unique.new_zeros(1, self.levels), unique]), "collision_rate": rate}

    def load_codes(self, artifact):
        self.item_codes.copy_(artifact["codes"])
        self.collision_rate = artifact["collision_rate"]
        self.build_code_trie()
        if self.code_embedding is not None:
            self._init_code_rows()

    def build_code_trie(self):
        """The trie over every item's code tokens + EOS (also the trie of the model's ``SoftLabelLoss``)."""
        self.trie = ItemTrie({i: self.item_token_ids(i) for i in range(1, self.n_items)}, self.eos)
        if getattr(self, "alignment", None) is not None:
            self.alignment.trie = self.trie

    @torch.no_grad()
    def _init_code_rows(self):
        """Table 7, at the start of fine-tuning: the code vectors are the trained codebooks (a copy: the quantizer
        keeps coding new items as tokenization trained it), and the code tokens' output rows (peft trainable
        tokens; with tied embeddings the same rows) start as the MLP's rows, so input and output rows start equal."""
        self.code_embedding.vectors.copy_(self.quantizer.codebooks.reshape(-1, self.cf_dim))
        rows = self.code_embedding()
        for delta in [p for n, p in self.llm.named_parameters() if "trainable_tokens_delta" in n]:
            delta.copy_(rows.to(delta.device, delta.dtype))

    def _code_rows_hook(self, module, args, output):
        """Forward hook of the LLM's input embedding: code tokens take ``code_embedding``'s rows (the gradient
        goes to the MLP and the code vectors, not to the trainable-token rows of the input side)."""
        position = args[0] - self.first_code_id
        is_code = (position >= 0) & (position < len(self.code_embedding.vectors))
        if not is_code.any():
            return None
        rows = self.code_embedding()[position.clamp(0, len(self.code_embedding.vectors) - 1)]
        return torch.where(is_code.unsqueeze(-1), rows.to(output.dtype), output)

    def fine_tuned_modules(self):
        """The final stage's modules: the LLM's adapters and new-token rows, and with ``code_token_init: mlp2 |
        mlp3`` the MLP and the code vectors (Table 7)."""
        return ["llm"] + (["code_embedding"] if getattr(self, "code_embedding", None) is not None else [])

    # ----- an item's code tokens ----------------------------------------------------------------------------
    def item_token_ids(self, item):
        """The LLM token ids of an item's N codes."""
        codes = self.new_item_codes[item] if item >= self.n_items else self.item_codes[item].cpu()
        return self.code_ids[torch.arange(self.levels), codes].tolist()

    def item_code_text(self, item):
        """An item's code tokens as text (e.g. ``<a_3><b_0><c_7>``): the tokenizer maps it back to its N tokens."""
        return "".join(self.tokenizer.convert_ids_to_tokens(self.item_token_ids(item)))

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if self.trie is None and self.item_codes[1:].any():  # a reloaded checkpoint: rebuild the trie
            self.build_code_trie()
        return result


class CodeEmbedding(nn.Module):
    """Table 7's mapping module: the input rows (N x C, H) of the code tokens, MLP(B^n_c) with ``layers`` linear
    layers and ReLU between, from the codebook vectors B^n_c (a trainable copy; width d of the CF embedding).

    The paper scales nothing; we standardise the rows over the whole matrix to the mean and standard deviation
    of the LLM's embedding table (``mean`` / ``std``, fixed numbers: nothing trainable), so that a random MLP
    starts at the scale of the other rows. The MLP runs in fp32 outside autocast. Under ``no_grad`` the rows are
    cached until a parameter changes in place (beam search embeds at every step).
    """

    def __init__(self, n_rows, dim, hidden, layers, mean, std):
        super().__init__()
        self.vectors = nn.Parameter(torch.zeros(n_rows, dim))
        widths = [dim] + [hidden] * layers
        self.mlp = nn.Sequential(*[m for a, b in zip(widths, widths[1:]) for m in (nn.Linear(a, b), nn.ReLU())][:-1])
        self.mean, self.std = mean, std
        self._cached = None

    def forward(self):
        key = tuple((p.data_ptr(), p._version) for p in self.parameters())
        if not torch.is_grad_enabled() and self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        with torch.autocast(self.vectors.device.type, enabled=False):
            rows = self.mlp(self.vectors.float())
            rows = (rows - rows.mean()) / rows.std().clamp(min=1e-8) * self.std + self.mean
        self._cached = None if torch.is_grad_enabled() else (key, rows)
        return rows

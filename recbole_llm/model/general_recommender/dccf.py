r"""
DCCF
################################################

Reference:
    Xubin Ren et al. "Disentangled Contrastive Collaborative Filtering." in SIGIR 2023.

Reference code:
    https://github.com/HKUDS/DCCF

Each layer combines graph message passing, intent-aware aggregation over learned intent prototypes and
message passing over two adaptively re-weighted graphs; a contrastive loss aligns the graph view with the
other three. Plain torch only: ``torch.sparse`` for the fixed graph, gather / scatter-add on the edges for
the learned ones.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from recbole.model.abstract_recommender import GeneralRecommender
from recbole.model.init import xavier_normal_initialization
from recbole.utils import InputType


class DCCF(GeneralRecommender):
    r"""DCCF: LightGCN-style propagation plus intent-aware and adaptive-augmentation views, trained with
    BPR, L2 on embeddings and prototypes, and an InfoNCE loss between the views.
    """

    input_type = InputType.PAIRWISE

    def __init__(self, config, dataset):
        super(DCCF, self).__init__(config, dataset)

        # hyper-parameters
        self.embedding_size = config["embedding_size"]
        self.n_layers = config["n_layers"]
        self.n_intents = config["n_intents"]
        self.emb_reg = config["emb_reg"]
        self.cen_reg = config["cen_reg"]
        self.ssl_reg = config["ssl_reg"]
        self.temperature = config["temperature"]

        # ID embeddings and the two sets of global intent prototypes P_u, P_i (d x K)
        self.user_embedding = nn.Embedding(self.n_users, self.embedding_size)
        self.item_embedding = nn.Embedding(self.n_items, self.embedding_size)
        self.user_intent = nn.Parameter(torch.empty(self.embedding_size, self.n_intents))
        self.item_intent = nn.Parameter(torch.empty(self.embedding_size, self.n_intents))
        self.apply(xavier_normal_initialization)
        nn.init.xavier_normal_(self.user_intent)
        nn.init.xavier_normal_(self.item_intent)

        # user-item graph over users + items (training edges, both directions) and G = D^-1/2 A D^-1/2
        self.n_nodes = self.n_users + self.n_items
        self.head, self.tail = self.get_edges(dataset)
        self.norm_adj_matrix = self.get_norm_adj_mat()

        # storage variables for full sort evaluation acceleration
        self.restore_user_e = None
        self.restore_item_e = None
        self.other_parameter_name = ["restore_user_e", "restore_item_e"]

    def get_edges(self, dataset):
        r"""Head and tail node of every training edge, users first, items offset by ``n_users``."""
        inter = dataset.inter_matrix(form="coo")
        inter.sum_duplicates()
        users = torch.from_numpy(inter.row).long()
        items = torch.from_numpy(inter.col).long() + self.n_users
        head = torch.cat([users, items]).to(self.device)
        tail = torch.cat([items, users]).to(self.device)
        return head, tail

    def get_norm_adj_mat(self):
        r"""Symmetric-normalised adjacency :math:`G = D^{-1/2} A D^{-1/2}` as a sparse tensor."""
        degree = torch.bincount(self.head, minlength=self.n_nodes).float()
        d_inv_sqrt = degree.pow(-0.5).nan_to_num(0.0, 0.0, 0.0)
        values = d_inv_sqrt[self.head] * d_inv_sqrt[self.tail]
        indices = torch.stack([self.head, self.tail])
        return torch.sparse_coo_tensor(indices, values, (self.n_nodes, self.n_nodes)).coalesce()

    def adaptive_propagate(self, views, embeddings):
        r"""Propagate ``embeddings`` through the adjacency learned from ``views``: edge weight
        (cos(x_h, x_t) + 1) / 2, divided by the head node's row sum. The weights take gradients, so
        the product is done edge by edge (gather, then scatter-add): torch.sparse's backward to the
        values of a sparse matrix builds a dense n_nodes x n_nodes matrix on CPU.
        """
        views = F.normalize(views, dim=1)
        alpha = ((views.index_select(0, self.head) * views.index_select(0, self.tail)).sum(dim=1) + 1) / 2
        row_sum = torch.zeros(self.n_nodes, device=alpha.device).index_add(0, self.head, alpha)
        weights = alpha / row_sum.index_select(0, self.head)
        messages = weights.unsqueeze(1) * embeddings.index_select(0, self.tail)
        return torch.zeros_like(embeddings).index_add(0, self.head, messages)

    def intent_aggregation(self, embeddings):
        r"""Users ``softmax(E_u P_u) P_u^T``, items ``softmax(E_i P_i) P_i^T``."""
        u_emb, i_emb = torch.split(embeddings, [self.n_users, self.n_items])
        u_int = torch.softmax(u_emb @ self.user_intent, dim=1) @ self.user_intent.T
        i_int = torch.softmax(i_emb @ self.item_intent, dim=1) @ self.item_intent.T
        return torch.cat([u_int, i_int], dim=0)

    def propagate(self):
        r"""Final embeddings (sum over layers) and each layer's views (Z, R, Z_aug, R_aug)."""
        embeddings = torch.cat([self.user_embedding.weight, self.item_embedding.weight], dim=0)
        embeddings_list, views = [embeddings], []
        for _ in range(self.n_layers):
            # 1. graph message passing
            gnn = torch.sparse.mm(self.norm_adj_matrix, embeddings)
            # 2. intent-aware aggregation
            intent = self.intent_aggregation(embeddings)
            # 3. adaptive augmentation: graphs re-weighted by the graph view and by the intent view
            gnn_aug = self.adaptive_propagate(gnn, embeddings)
            intent_aug = self.adaptive_propagate(intent, embeddings)
            # 4. next layer: all views plus a residual
            embeddings = gnn + intent + gnn_aug + intent_aug + embeddings
            embeddings_list.append(embeddings)
            views.append((gnn, intent, gnn_aug, intent_aug))
        all_embeddings = torch.stack(embeddings_list, dim=1).sum(dim=1)
        return all_embeddings, views

    def forward(self):
        all_embeddings, _ = self.propagate()
        user_all_embeddings, item_all_embeddings = torch.split(all_embeddings, [self.n_users, self.n_items])
        return user_all_embeddings, item_all_embeddings

    def info_nce(self, anchor, other):
        r"""InfoNCE between L2-normalised views: same node positive, the batch's other nodes negatives."""
        anchor, other = F.normalize(anchor, dim=1), F.normalize(other, dim=1)
        logits = anchor @ other.T / self.temperature
        return F.cross_entropy(logits, torch.arange(len(anchor), device=logits.device))

    def ssl_loss(self, users, items, views):
        r"""Graph view against intent, graph-augmented and intent-augmented views, summed over layers."""
        users, items = torch.unique(users), torch.unique(items) + self.n_users
        loss = 0.0
        for gnn, *others in views:
            for other in others:
                for nodes in (users, items):
                    loss = loss + self.info_nce(gnn[nodes], other[nodes])
        return loss

    def calculate_loss(self, interaction):
        # clear the storage variable when training
        if self.restore_user_e is not None or self.restore_item_e is not None:
            self.restore_user_e, self.restore_item_e = None, None

        user = interaction[self.USER_ID]
        pos_item = interaction[self.ITEM_ID]
        neg_item = interaction[self.NEG_ITEM_ID]

        all_embeddings, views = self.propagate()
        user_all_embeddings, item_all_embeddings = torch.split(all_embeddings, [self.n_users, self.n_items])

        # BPR on the final embeddings
        u_embeddings = user_all_embeddings[user]
        pos_scores = (u_embeddings * item_all_embeddings[pos_item]).sum(dim=1)
        neg_scores = (u_embeddings * item_all_embeddings[neg_item]).sum(dim=1)
        bpr_loss = F.softplus(neg_scores - pos_scores).mean()

        # L2 on the batch's layer-0 embeddings (squared norms summed over the batch, as the authors do)
        emb_loss = self.emb_reg * (
            self.user_embedding(user).norm(2).pow(2)
            + self.item_embedding(pos_item).norm(2).pow(2)
            + self.item_embedding(neg_item).norm(2).pow(2)
        )

        # L2 on the intent prototypes
        cen_loss = self.cen_reg * (self.user_intent.norm(2).pow(2) + self.item_intent.norm(2).pow(2))

        # contrastive loss between the views
        ssl_loss = self.ssl_reg * self.ssl_loss(user, pos_item, views)

        return bpr_loss, emb_loss, cen_loss, ssl_loss

    def predict(self, interaction):
        user = interaction[self.USER_ID]
        item = interaction[self.ITEM_ID]

        user_all_embeddings, item_all_embeddings = self.forward()

        u_embeddings = user_all_embeddings[user]
        i_embeddings = item_all_embeddings[item]
        scores = torch.mul(u_embeddings, i_embeddings).sum(dim=1)
        return scores

    def full_sort_predict(self, interaction):
        user = interaction[self.USER_ID]
        if self.restore_user_e is None or self.restore_item_e is None:
            self.restore_user_e, self.restore_item_e = self.forward()
        # get user embedding from storage variable
        u_embeddings = self.restore_user_e[user]

        # dot with all item embedding to accelerate
        scores = torch.matmul(u_embeddings, self.restore_item_e.transpose(0, 1))

        return scores.view(-1)

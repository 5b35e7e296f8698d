"""BASELINE ONLY — the seed's reference policy network, for ``make bench`` comparisons.

Copied from the seed implementation guide (``../shared/seeds/001_*.txt``,
``TamiyoPolicyGNN``), architecture unchanged, so the benchmark can run it "the seed's
way": build a PyG ``Batch.from_data_list`` per call and run one forward. It keeps the
seed's defects on purpose (``layer_priorities`` is a softmax over the *batch* of graphs,
not over layers); Tamiyo never uses this module. Only the config was reduced to the
fields the network uses, and widths are passed in so the bench compares equal sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch_geometric.nn import GCNConv, global_max_pool, global_mean_pool


@dataclass
class SeedPolicyConfig:
    """The seed's PolicyConfig, architecture fields only (seed defaults: 64, 128, 3)."""

    node_feature_dim: int = 64
    hidden_dim: int = 128
    num_gnn_layers: int = 3


class SeedTamiyoPolicyGNN(nn.Module):
    """The seed's ``TamiyoPolicyGNN`` (baseline; see module docstring)."""

    def __init__(self, config: SeedPolicyConfig):
        super().__init__()
        self.config = config
        self.node_encoder = nn.Sequential(
            nn.Linear(config.node_feature_dim, config.hidden_dim),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(config.hidden_dim, config.hidden_dim),
        )
        self.gnn_layers = nn.ModuleList(
            [GCNConv(config.hidden_dim, config.hidden_dim) for _ in range(config.num_gnn_layers)]
        )
        self.decision_head = nn.Sequential(
            nn.Linear(config.hidden_dim * 2, config.hidden_dim),
            nn.ReLU(),
            nn.Dropout(0.2),
            nn.Linear(config.hidden_dim, 64),
            nn.ReLU(),
            nn.Linear(64, 3),
        )
        self.value_head = nn.Sequential(
            nn.Linear(config.hidden_dim * 2, config.hidden_dim),
            nn.ReLU(),
            nn.Linear(config.hidden_dim, 1),
        )

    def forward(
        self,
        node_features: torch.Tensor,
        edge_index: torch.Tensor,
        batch: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.node_encoder(node_features)
        for gnn_layer in self.gnn_layers:
            x_new = F.relu(gnn_layer(x, edge_index))
            x = x + x_new
            x = F.dropout(x, training=self.training)
        if batch is None:
            batch = torch.zeros(x.size(0), dtype=torch.long, device=x.device)
        graph_mean = global_mean_pool(x, batch)
        graph_max = global_max_pool(x, batch)
        graph_repr = torch.cat([graph_mean, graph_max], dim=1)
        decision_logits = self.decision_head(graph_repr)
        adaptation_prob = torch.sigmoid(decision_logits[:, 0])
        layer_priorities = F.softmax(decision_logits[:, 1], dim=-1)  # seed defect, kept
        urgency_score = torch.sigmoid(decision_logits[:, 2])
        value_estimate = self.value_head(graph_repr)
        return adaptation_prob, layer_priorities, urgency_score, value_estimate

"""Layers shared by the LLM models."""
import torch
from torch import nn


class Projector(nn.Linear):
    """A node projector ``V = W E + b`` from CF-embedding space into the LLM's token space (GLTA eq. 1-2)."""

    @torch.no_grad()
    def calibrate(self, sample, target_std):
        """Rescale the weights so projected vectors start with the LLM token embeddings' spread."""
        out_std = self(sample.to(self.weight.device, self.weight.dtype)).std().item()
        if out_std > 0:
            self.weight.mul_(target_std / out_std)
            self.bias.mul_(target_std / out_std)

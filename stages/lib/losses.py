"""Contrastive loss (pure function)."""
import torch
import torch.nn.functional as F


def nt_xent(z1, z2, temperature):
    """NT-Xent loss of SimCLR (Chen et al., 2020, Algorithm 1), averaged over all 2B views.

    z1, z2: (B, D) projections of two views of the same B images; row i of z1 and row i
    of z2 are a positive pair, and every other view in the batch is a negative.
    Returns a scalar tensor. Computed in float32 whatever the input dtype.
    """
    batch = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # (2B, D), unit rows
    logits = z @ z.T / temperature  # (2B, 2B) cosine similarities / t
    logits.fill_diagonal_(float("-inf"))  # a view is not its own negative
    positives = torch.arange(2 * batch, device=z.device).roll(batch)  # view i pairs with i +- B
    return F.cross_entropy(logits, positives)

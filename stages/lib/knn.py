"""kNN monitor: how well frozen backbone features separate classes, without training a head.

Weighted kNN on cosine similarity (Wu et al., 2018): each of the k nearest training
features votes for its label with weight exp(similarity / temperature).
"""
import torch
import torch.nn.functional as F

from stages.lib.train import infer


def embed(backbone, images, standardize):
    """uint8 (N, 3, H, W) on the model's device -> L2-normalized float32 features (N, D)."""
    return F.normalize(infer(backbone, images, standardize), dim=1)


@torch.no_grad()
def knn_predict(train_features, train_labels, query_features, k, temperature, num_classes, chunk=1024):
    """Labels (Q,) predicted for query features (Q, D) from train features (N, D) and labels (N,)."""
    k = min(k, len(train_features))
    predictions = []
    for start in range(0, len(query_features), chunk):
        similarity = query_features[start : start + chunk] @ train_features.T  # (q, N)
        top_sim, top_idx = similarity.topk(k, dim=1)  # (q, k)
        weights = (top_sim / temperature).exp()
        votes = torch.zeros(len(top_sim), num_classes, device=similarity.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)  # (q, C)
        predictions.append(votes.argmax(1))
    return torch.cat(predictions)


class KNNMonitor:
    """How good a backbone's features are while it trains: weighted kNN accuracy on labeled images
    (device tensors: train_x uint8 (N, 3, H, W), train_y (N,), val_x, val_y), method-agnostic."""

    def __init__(self, train_x, train_y, val_x, val_y, num_classes, standardize, k, temperature):
        self.train_x, self.train_y, self.val_x, self.val_y = train_x, train_y, val_x, val_y
        self.num_classes = num_classes
        self.standardize, self.k, self.temperature = standardize, k, temperature

    def __call__(self, backbone):
        """Fraction of validation images whose kNN label (from the training images) is right."""
        train_features = embed(backbone, self.train_x, self.standardize)  # (N, D)
        val_features = embed(backbone, self.val_x, self.standardize)  # (V, D)
        predicted = knn_predict(train_features, self.train_y, val_features, self.k, self.temperature,
                                self.num_classes)
        return (predicted == self.val_y).float().mean().item()

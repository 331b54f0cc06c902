"""kNN monitor: how well frozen backbone features separate classes, without training a head.

Weighted kNN on cosine similarity (Wu et al., 2018): each of the k nearest training
features votes for its label with weight exp(similarity / temperature).
"""
import torch
import torch.nn.functional as F

from stages.lib.train import infer


def embed(backbone, images, batch_size):
    """uint8 (N, 3, H, W) on the model's device -> L2-normalized float32 features (N, D)."""
    return F.normalize(infer(backbone, images, batch_size), dim=1)


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


def knn_accuracy(backbone, train_images, train_labels, val_images, val_labels, k, temperature, batch_size):
    """Fraction of validation images whose kNN label (from the training images) is right."""
    num_classes = int(max(train_labels.max(), val_labels.max())) + 1
    train_features = embed(backbone, train_images, batch_size)
    val_features = embed(backbone, val_images, batch_size)
    predicted = knn_predict(train_features, train_labels, val_features, k, temperature, num_classes)
    return (predicted == val_labels).float().mean().item()

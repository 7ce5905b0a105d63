"""A small digit classifier, trained by train.py on the real digits. It checks that the diffusion
model's samples show the class they were asked for, and it is the in-domain feature network of
evaluate.py when the Inception weights are not available (its penultimate layer gives the features,
its logits the Inception Score, its last conv map the spatial features for sFID)."""
import torch.nn as nn


class DigitClassifier(nn.Module):
    def __init__(self, in_channels=1, num_classes=10, width=32, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward(self, x, return_features=False):
        """x: images in [-1, 1], [B, 1, 8, 8]. Returns logits, or (logits, features, spatial)."""
        spatial = self.conv(x)
        feats = self.fc(spatial)
        logits = self.head(feats)
        return (logits, feats, spatial) if return_features else logits

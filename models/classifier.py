"""Small in-domain classifiers, trained by train.py on the real data of each embedded default: the
digits (8x8 grayscale) and the photograph patches (32x32 RGB, the class being the source photograph).
Each checks that the diffusion model's samples show the class they were asked for, and is the
in-domain feature network of evaluate.py (its penultimate layer gives the features, its logits the
Inception Score, its last conv map the spatial features for sFID)."""
import torch.nn as nn

from models.files import CLASSIFIER_FORMAT, VERSIONS, check_format, load_file


class FeatureClassifier(nn.Module):
    """conv (the spatial map) -> fc (the features) -> head (the logits); subclasses build the three."""

    def forward(self, x, return_features=False):
        """x: images in [-1, 1]. Returns logits, or (logits, features, spatial)."""
        spatial = self.conv(x)
        feats = self.fc(spatial)
        logits = self.head(feats)
        return (logits, feats, spatial) if return_features else logits


class DigitClassifier(FeatureClassifier):
    """8x8 grayscale digits: one halving to a 4x4 map."""

    def __init__(self, in_channels=1, num_classes=10, width=32, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)


class PhotoClassifier(FeatureClassifier):
    """The same idea for 32x32 RGB patches: three halvings to a 4x4 map, then the feature layer."""

    def __init__(self, in_channels=3, num_classes=10, width=32, feature_dim=128):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.GELU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2),
            nn.Conv2d(4 * width, 4 * width, 3, padding=1), nn.GELU(), nn.MaxPool2d(2))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.GELU())
        self.head = nn.Linear(feature_dim, num_classes)


# arch name -> (class, input shape [C, H, W]); a classifier checkpoint names its arch
CLASSIFIERS = {"digits": (DigitClassifier, (1, 8, 8)), "photos": (PhotoClassifier, (3, 32, 32))}


# ---- files
def classifier_checkpoint(model, arch, **extra):
    return dict(format=CLASSIFIER_FORMAT, version=VERSIONS[CLASSIFIER_FORMAT], arch=arch,
                state_dict=model.state_dict(), **extra)


def load_classifier(path, with_arch=False):
    """The classifier of a train.py --net classifier checkpoint (and its arch name, 'digits' or
    'photos', when with_arch)."""
    ckpt = load_file(path)
    check_format(ckpt, path, CLASSIFIER_FORMAT, "rerun train.py --net classifier")
    arch = ckpt.get("arch", "digits")  # version 1 files are digit classifiers
    if arch not in CLASSIFIERS:
        raise ValueError(f"{path}: unknown classifier arch {arch!r} (this code knows {sorted(CLASSIFIERS)})")
    model = CLASSIFIERS[arch][0]()
    model.load_state_dict(ckpt["state_dict"])
    return (model.eval(), arch) if with_arch else model.eval()
